"""Tests for ``common.plots``: each stage's figures from synthetic ``metrics.jsonl``, a pipeline root, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import matplotlib.image as mpimg
import pytest

import common.plots
from common.plots import detect_stage, moving_average, plot_pipeline, plot_run, series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_records(n: int = 30) -> list[dict]:
    recs = [{"step": 0, "eval_loss": 7.7, "eval_mean_token_accuracy": 0.0}]  # the eval before training
    for s in range(5, 5 * n + 1, 5):
        recs.append({"step": s, "epoch": s / 300, "loss": None if s == 15 else 7.5 - 1.5 * math.log1p(s / 20),
                     "learning_rate": 5e-3, "grad_norm": None if s == 10 else 1.0, "mean_token_accuracy": s / 2000,
                     "entropy": 6.0})
        if s % 50 == 0:
            recs[-1]["eval_loss"] = 7.4 - 1.4 * math.log1p(s / 20)
    return recs


def rm_records(n: int = 60) -> list[dict]:
    recs = []
    for s in range(1, n + 1):
        acc = min(1.0, 0.5 + 0.35 * s / n + 0.15 * math.sin(3 * s))  # noisy per-batch accuracy, rising
        rec = {"step": s, "loss": 0.7 - s / 200, "accuracy": None if s == 6 else acc, "margin": s / 50}
        if s % 20 == 0:
            rec.update(eval_loss=0.68 - s / 250, eval_accuracy=0.5 + 0.35 * s / n, eval_margin=s / 40)
        recs.append(rec)
    return recs


def ppo_records(n: int = 40) -> list[dict]:
    return [{"step": s, "objective/scores": -1 + s / 20 + 0.3 * math.sin(s), "objective/scores_std": 0.5,
             "objective/kl": s / 40, "objective/kl_coef": 0.2 - s / 1000, "objective/rlhf_reward": -1 + s / 25,
             "objective/entropy": 3 - s / 40, "response/length_mean": 40 + s, "response/eos_fraction": 0.5,
             "policy/approxkl": 0.01, "policy/clipfrac": float("nan") if s == 1 else 0.1,
             "loss/policy": None if s == 2 else -0.01, "loss/value": 0.5, "val/explained_variance": 0.1,
             "time/rollout": 1.2} for s in range(1, n + 1)]


def dpo_records(n: int = 30) -> list[dict]:
    """What DPOTrainer logs (keys as in a real run's metrics.jsonl), with an evaluation before training."""
    recs = [{"step": 0, "eval_loss": 0.693, "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0}]
    for s in range(2, 2 * n + 1, 2):
        recs.append({"step": s, "loss": 0.69 - s / 200, "rewards/accuracies": min(1.0, 0.4 + s / 80),
                     "rewards/margins": s / 40, "rewards/chosen": -s / 100, "logps/rejected": -300.0})
        if s % 20 == 0:
            recs.append({"step": s, "eval_loss": 0.69 - s / 220, "eval_rewards/accuracies": 0.5 + s / 200,
                         "eval_rewards/margins": s / 45})
    return recs


def write_run(folder, records: list[dict]) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for r in records:  # json.dumps writes NaN as NaN, as Python's json reads it back
            f.write(json.dumps(r) + "\n")
    return str(folder)


def assert_png(path: str) -> None:
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG", path
    assert os.path.getsize(path) > 5000, (path, os.path.getsize(path))
    assert mpimg.imread(path).var() > 0, f"{path} is blank"


# The series each panel of a stage's figure must draw, in panel order; written out here, not read from common.plots,
# so that a panel key drifting from the metric the trainer logs fails
PANELS = {
    "sft_loss.png": [["loss", "eval_loss"]],
    "rm_accuracy.png": [["accuracy", "eval_accuracy"]],
    "rm_loss.png": [["loss", "eval_loss"]],
    "ppo.png": [["objective/scores"], ["objective/kl"], ["objective/kl_coef"], ["response/length_mean"],
                ["objective/entropy"], ["objective/rlhf_reward"]],
    "dpo.png": [["loss", "eval_loss"], ["rewards/accuracies", "eval_rewards/accuracies"],
                ["rewards/margins", "eval_rewards/margins"]],
}
PANELS["rloo.png"] = PANELS["grpo.png"] = PANELS["ppo.png"]  # training_rl.py --algorithm rloo|grpo: PPO's panels


@pytest.fixture
def figures(monkeypatch) -> dict:
    """The figure behind each PNG the plot functions save, by path (``_save`` closes it; its artists stay)."""
    saved, real = {}, common.plots._save

    def save(fig, out_dir, name, title):
        path = real(fig, out_dir, name, title)
        saved[path] = fig
        return path

    monkeypatch.setattr(common.plots, "_save", save)
    return saved


def assert_drawn(path: str, figures: dict, records: list[dict]) -> None:
    """``path`` is a PNG, and each visible panel of its figure draws every series it should, point for point, from
    ``records`` (the raw line; the smoothed one is beside it), and none says "no data"."""
    assert_png(path)
    fig = figures[path]
    panels = PANELS.get(os.path.basename(path)) or [[k] for k in dict.fromkeys(k for r in records for k in r)
                                                    if k not in ("step", "epoch") and series(records, k)[0]][:12]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(panels), (path, [ax.get_title() for ax in axes])
    for ax, keys in zip(axes, panels):
        assert not any(t.get_text() == "no data" for t in ax.texts), (path, ax.get_title())
        lines = [([float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]) for line in ax.lines]
        expected = [series(records, k) for k in keys if series(records, k)[0]]
        assert expected, (path, keys)  # the records do hold data for this panel
        for xy in expected:
            assert (list(map(float, xy[0])), xy[1]) in lines, (path, ax.get_title(), keys)


@pytest.mark.parametrize("records, names", [
    (sft_records(), ["sft_loss.png"]),
    (rm_records(), ["rm_accuracy.png", "rm_loss.png"]),
    (ppo_records(), ["ppo.png"]),
    (dpo_records(), ["dpo.png"]),
    ([{"step": s, "foo": s * 2.0, "bar/baz": None if s == 3 else 1.0 / s, "note": "x"} for s in range(1, 20)],
     ["metrics.png"]),
], ids=["sft", "rm", "ppo", "dpo", "generic"])
def test_plot_run_each_stage(tmp_path, figures, records, names):
    run_dir = write_run(tmp_path / "run", records)
    written = plot_run(run_dir)
    assert sorted(written) == sorted(os.path.join(run_dir, n) for n in names)
    for path in written:
        assert_drawn(path, figures, records)


@pytest.mark.parametrize("records", [sft_records(1)[1:], rm_records(1), ppo_records(1), [{"step": 7, "x": 1.0}]],
                         ids=["sft", "rm", "ppo", "generic"])
def test_single_data_point(tmp_path, figures, records):
    out = tmp_path / "figs"
    written = plot_run(write_run(tmp_path / "run", records), str(out))
    assert written and all(os.path.dirname(p) == str(out) for p in written)
    for path in written:
        assert_drawn(path, figures, records)


def test_generic_panel_cap(tmp_path, figures):
    records = [{"step": s, **{f"m{i}": float(i + s) for i in range(20)}} for s in range(5)]
    [path] = plot_run(write_run(tmp_path / "run", records))
    assert_drawn(path, figures, records)  # the first 12 keys, in order


def test_helpers():
    assert detect_stage(sft_records()) == "sft" and detect_stage(rm_records()) == "rm"
    assert detect_stage(ppo_records()) == "ppo" and detect_stage([{"step": 1, "x": 1.0}]) == "generic"
    steps, values = series([{"step": 1, "a": None}, {"step": 2, "a": float("nan")}, {"step": 3, "a": 2}, {"step": 4}],
                           "a")
    assert (steps, values) == ([3], [2.0])
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=3) == [2.0, 3.0, 5.0, 6.0]
    assert moving_average([4.0]) == [4.0]


def test_plot_pipeline(tmp_path, figures):
    root = tmp_path / "pipeline"
    records = {"sft_loss.png": sft_records(), "rm_accuracy.png": rm_records(), "ppo.png": ppo_records()}
    write_run(root / "sft", records["sft_loss.png"])
    write_run(root / "rm", records["rm_accuracy.png"])
    write_run(root / "ppo", records["ppo.png"])
    written = plot_pipeline(str(root))
    assert sorted(os.path.basename(p) for p in written) == ["ppo.png", "rm_accuracy.png", "sft_loss.png"]
    for path in written:
        assert os.path.dirname(path) == str(root)
        assert_drawn(path, figures, records[os.path.basename(path)])
    # a missing stage is skipped
    write_run(tmp_path / "partial" / "ppo", ppo_records())
    assert [os.path.basename(p) for p in plot_pipeline(str(tmp_path / "partial"), str(tmp_path / "out"))] == ["ppo.png"]
    # RLOO and GRPO (training_rl.py --algorithm) log PPO's names without the critic's: PPO's panels, under their name
    critic_free = [{k: v for k, v in r.items() if not k.startswith("val/")} for r in ppo_records()]
    write_run(tmp_path / "grpo_run" / "grpo", critic_free)
    written = plot_pipeline(str(tmp_path / "grpo_run"))
    assert [os.path.basename(p) for p in written] == ["grpo.png"]
    assert_drawn(written[0], figures, records["ppo.png"])


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.plots", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    sft = write_run(tmp_path / "sft_run", sft_records())
    root = tmp_path / "pipeline"
    write_run(root / "rm", rm_records())
    write_run(root / "ppo", ppo_records())
    proc = run_cli(sft, root, "--out", tmp_path / "figs")
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    assert sorted(os.path.basename(p) for p in printed) == ["ppo.png", "rm_accuracy.png", "sft_loss.png"]
    for path in printed:
        assert path.startswith(str(tmp_path / "figs"))
        assert_png(path)

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(sft, empty)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {empty} has no metrics.jsonl"), proc.stderr
    assert not os.path.exists(os.path.join(sft, "sft_loss.png"))  # nothing written before the check
