"""PNG plots of a stage's ``metrics.jsonl`` (SFT, reward model, PPO, or any other keys) and of a whole pipeline.

    python -m common.plots runs/sft                    # writes runs/sft/sft_loss.png
    python -m common.plots runs/rm runs/ppo --out figs # one sub-folder of figs per run
    python -m common.plots runs/pipeline               # a root with sft/ rm/ ppo/: sft_loss, rm_accuracy, ppo.png

Null and NaN values are skipped; a run with a single log step still gives a readable figure.
"""

from __future__ import annotations

import math
import os
import sys
from functools import partial

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.cli import ArgumentParser, UserError, run  # noqa: E402
from common.outputs import METRICS_FILE, read_metrics  # noqa: E402

PIPELINE_STAGES = ("sft", "rm", "ppo", "rloo", "grpo", "dpo")
PPO_PANELS = [("objective/scores", "score"), ("objective/kl", "KL"), ("objective/kl_coef", "KL coefficient"),
              ("response/length_mean", "response length (tokens)"), ("objective/entropy", "entropy"),
              ("objective/rlhf_reward", "RLHF reward (score - KL penalty)")]
MAX_GENERIC_PANELS = 12


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of ``key``, skipping records without it and null, NaN or non-numeric values."""
    pairs = [(r["step"], float(r[key])) for r in records if _num(r.get(key)) and _num(r.get("step"))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def smoothing_window(n: int) -> int:
    """Points per moving average: an odd number near a tenth of the run, 1 (none) under 20 points, at most 51."""
    return max(1, min(50, n // 10)) | 1


def moving_average(values: list[float], window: int | None = None) -> list[float]:
    """Centred mean over about ``window`` points (default ``smoothing_window``; no lag, unlike a trailing one),
    narrower at the ends."""
    half = (window or smoothing_window(len(values))) // 2
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    spans = [(max(0, i - half), min(len(values), i + half + 1)) for i in range(len(values))]
    return [(sums[hi] - sums[lo]) / (hi - lo) for lo, hi in spans]


def detect_stage(records: list[dict]) -> str:
    """``ppo``, ``dpo``, ``rm``, ``sft`` or ``generic``, from the keys the run logged."""
    keys = set().union(*records) if records else set()
    if "objective/scores" in keys:
        return "ppo"
    if keys & {"rewards/margins", "eval_rewards/margins"}:
        return "dpo"
    if keys & {"accuracy", "eval_accuracy", "margin", "eval_margin"}:
        return "rm"
    if keys & {"loss", "eval_loss"}:
        return "sft"
    return "generic"


def _raw_and_smoothed(ax, records: list[dict], key: str, label: str) -> bool:
    """The raw series faint and its moving average solid (raw alone, with a marker for a lone point, when too
    short to smooth); False when ``key`` has no values."""
    x, y = series(records, key)
    window = smoothing_window(len(y))
    if not x:
        return False
    if window == 1:
        ax.plot(x, y, color="C0", linewidth=1.5, marker="o" if len(x) == 1 else None, label=label)
    else:
        ax.plot(x, y, color="C0", alpha=0.3, linewidth=1, label=f"{label} (raw)")
        ax.plot(x, moving_average(y, window), color="C0", linewidth=2, label=f"{label} ({window}-point avg)")
    return True


def _finish(ax, title: str, ylabel: str = "", has_data: bool = True, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lo, hi = ax.get_xlim()
    if hi - lo < 2:  # one step logged: a whole-number axis around it, not 0.96 .. 1.04
        ax.set_xlim((lo + hi) / 2 - 1, (lo + hi) / 2 + 1)
    if not has_data:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif legend:
        ax.legend(fontsize="small")


def _save(fig, out_dir: str, name: str, title: str) -> str:
    fig.suptitle(title, fontweight="bold")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sft(records: list[dict], out_dir: str, title: str) -> list[str]:
    """``sft_loss.png``: train loss (line) and eval loss (markers and line) against step."""
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    x, y = series(records, "loss")
    ex, ey = series(records, "eval_loss")
    if x:
        ax.plot(x, y, color="C0", marker="o" if len(x) == 1 else None, label="train loss")
    if ex:
        ax.plot(ex, ey, color="C1", marker="o", linewidth=1.5, label="eval loss")
    _finish(ax, "SFT loss", "loss", has_data=bool(x or ex))
    return [_save(fig, out_dir, "sft_loss.png", title)]


def plot_rm(records: list[dict], out_dir: str, title: str, with_loss: bool = True) -> list[str]:
    """``rm_accuracy.png`` (train raw and smoothed, eval, chance line) and ``rm_loss.png``."""
    written = []
    for key, ylabel in [("accuracy", "pairwise accuracy"), ("loss", "loss")][:2 if with_loss else 1]:
        fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
        has_train = _raw_and_smoothed(ax, records, key, f"train {key}")
        ex, ey = series(records, f"eval_{key}")
        if ex:
            ax.plot(ex, ey, color="C1", marker="o", linewidth=1.5, label=f"eval {key}")
        if key == "accuracy":
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance (0.5)")
            ax.set_ylim(-0.02, 1.02)
        _finish(ax, f"Reward model {key}", ylabel, has_data=has_train or bool(ex))
        written.append(_save(fig, out_dir, f"rm_{key}.png", title))
    return written


def plot_dpo(records: list[dict], out_dir: str, title: str) -> list[str]:
    """``dpo.png``: the loss, and the implicit reward's pairwise accuracy and margin (train raw and smoothed, eval
    markers), with the loss of a policy equal to its reference (log 2) and chance (0.5) as dashed lines."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    for ax, (key, name, line) in zip(axes, [("loss", "DPO loss", (math.log(2), "policy = reference (log 2)")),
                                            ("rewards/accuracies", "implicit reward accuracy", (0.5, "chance (0.5)")),
                                            ("rewards/margins", "implicit reward margin", (0.0, "no margin"))]):
        has_train = _raw_and_smoothed(ax, records, key, f"train {name.split()[-1]}")
        ex, ey = series(records, f"eval_{key}")
        if ex:
            ax.plot(ex, ey, color="C1", marker="o", linewidth=1.5, label=f"eval {name.split()[-1]}")
        ax.axhline(line[0], color="gray", linestyle="--", linewidth=1, label=line[1])
        _finish(ax, name, has_data=has_train or bool(ex))
    return [_save(fig, out_dir, "dpo.png", title)]


def plot_ppo(records: list[dict], out_dir: str, title: str, name: str = "ppo.png") -> list[str]:
    """``ppo.png``: score (with a ±std band), KL, KL coefficient, length, entropy, RLHF reward; with held-out
    evaluations (``eval/*``, training_rl.py --eval_freq) also the reward-model score and the gold score of the held-out
    answers side by side, on two axes (reward hacking: the first rising while the second stays flat or falls), and
    the value head's explained variance."""
    held_out = bool(series(records, "eval/rm_score")[0])
    fig, axes = plt.subplots(2, 4 if held_out else 3, figsize=(20 if held_out else 15, 8), layout="constrained")
    panels = axes.flat
    for i, (ax, (key, label)) in enumerate(zip(panels, PPO_PANELS)):
        has = _raw_and_smoothed(ax, records, key, "value")
        if key == "objective/scores":
            band = [(r["step"], r[key], r["objective/scores_std"]) for r in records
                    if _num(r.get("step")) and _num(r.get(key)) and _num(r.get("objective/scores_std"))]
            if len(band) == 1:
                ax.errorbar([band[0][0]], [band[0][1]], yerr=[band[0][2]], color="C0", capsize=6, label="± std")
            elif band:
                ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                color="C0", alpha=0.12, label="± std (batch)")
        _finish(ax, label, key, has_data=has, legend=i == 0)
    if held_out:
        ax = axes.flat[6]
        x, y = series(records, "eval/rm_score")
        ax.plot(x, y, color="C0", marker="o", label="reward-model score")
        ax.set_ylabel("reward-model score", color="C0")
        gx, gy = series(records, "eval/gold")
        if gx:
            twin = ax.twinx()
            twin.plot(gx, gy, color="C3", marker="s", label="gold score")
            twin.set_ylabel("gold score", color="C3")
            twin.legend(loc="lower right", fontsize="small")
        _finish(ax, "held-out answers: proxy and gold", has_data=True, legend=True)
        ax = axes.flat[7]
        has = _raw_and_smoothed(ax, records, "val/explained_variance", "value")
        _finish(ax, "value head: explained variance", "val/explained_variance", has_data=has, legend=False)
    return [_save(fig, out_dir, name, title)]


def plot_generic(records: list[dict], out_dir: str, title: str, name: str = "metrics.png") -> list[str]:
    """``metrics.png``: one small panel per numeric key (the first 12), raw faint and moving average."""
    keys = [k for k in dict.fromkeys(k for r in records for k in r)
            if k not in ("step", "epoch") and series(records, k)[0]]
    keys = keys[:MAX_GENERIC_PANELS] or ["(no numeric metrics)"]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for i, (ax, key) in enumerate(zip(axes.flat, keys)):
        _finish(ax, key, has_data=_raw_and_smoothed(ax, records, key, "value"), legend=i == 0)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    return [_save(fig, out_dir, name, title)]


def _name(folder: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(folder)))


def _load(run_dir: str) -> list[dict]:
    records = read_metrics(run_dir)
    if not records:
        what = "an empty" if os.path.isfile(os.path.join(run_dir, METRICS_FILE)) else "no"
        raise UserError(f"{run_dir} has {what} {METRICS_FILE}")
    return records


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Plot one stage's ``metrics.jsonl`` into ``out_dir`` (default ``run_dir``); returns the files written."""
    records = _load(run_dir)
    plotter = {"sft": plot_sft, "rm": plot_rm, "ppo": plot_ppo, "dpo": plot_dpo,
               "generic": plot_generic}[detect_stage(records)]
    return plotter(records, out_dir or run_dir, _name(run_dir))


def pipeline_runs(root: str) -> list[str]:
    """The stage folders of a pipeline root (``sft``, ``rm``, ``ppo``/``rloo``/``grpo``, ``dpo``) that hold a
    ``metrics.jsonl``."""
    return [s for s in PIPELINE_STAGES if os.path.isfile(os.path.join(root, s, METRICS_FILE))]


def plot_pipeline(root: str, out_dir: str | None = None) -> list[str]:
    """One summary figure per stage of a pipeline root: ``sft_loss.png``, ``rm_accuracy.png``, and ``ppo.png``,
    ``rloo.png``, ``grpo.png`` (the same panels) or ``dpo.png``."""
    out_dir, written = out_dir or root, []
    for stage in pipeline_runs(root):
        records = _load(os.path.join(root, stage))
        title, detected = f"{_name(root)}/{stage}", detect_stage(records)
        if detected == "generic":  # not the metrics this folder name promises: a generic figure, named apart
            written += plot_generic(records, out_dir, title, name=f"{stage}_metrics.png")
        else:
            plotter = {"sft": plot_sft, "rm": partial(plot_rm, with_loss=False),
                       "ppo": partial(plot_ppo, name=f"{stage}.png"), "dpo": plot_dpo}[detected]
            written += plotter(records, out_dir, title)
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m common.plots RUN_DIR [RUN_DIR ...] [--out OUT_DIR]``; prints each file written."""
    parser = ArgumentParser(prog="python -m common.plots", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a stage output folder or a pipeline root")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: each RUN_DIR)")
    args = parser.parse_args(argv)
    for d in args.run_dirs:  # check every folder before writing anything
        if not os.path.isfile(os.path.join(d, METRICS_FILE)) and not pipeline_runs(d):
            raise UserError(f"{d} has no {METRICS_FILE}")
    for d in args.run_dirs:
        out = args.out and (os.path.join(args.out, _name(d)) if len(args.run_dirs) > 1 else args.out)
        files = plot_run(d, out) if os.path.isfile(os.path.join(d, METRICS_FILE)) else plot_pipeline(d, out)
        print("\n".join(files), flush=True)


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
