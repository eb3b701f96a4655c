"""benchmarks/run.py runs end to end and writes its figures. Not a timed test: it checks the figures are finite and
that each stage's ratio to the bare loop is sane (ours no worse than half the bare loop's speed, and not several
times faster, which would mean the two sides do different work); the table and JSON are for people."""

import json
import math

import pytest

from conftest import run_script

REQUIRED = [
    "sft.ratio_to_bare", "sft.ours.tokens_per_s", "sft.bare.tokens_per_s", "sft.ours.median_s", "sft.bare.median_s",
    "rm.ratio_to_bare", "rm.ours.pairs_per_s", "rm.bare.pairs_per_s",
    "ppo.ratio_to_bare", "ppo.ours.episodes_per_s", "ppo.bare.episodes_per_s",
    "ppo.ours.generate_s_median", "ppo.ours.score_s_median", "ppo.ours.train_s_median",
    "ppo.bare.generate_s_median", "ppo.bare.score_s_median", "ppo.bare.train_s_median",
    "ppo.peak_rss_over_weights", "ppo.peak_rss_bytes", "ppo.weight_bytes",
    "model.params", "model.weight_bytes", "environment.torch_threads",
]


def _get(results: dict, dotted: str):
    value = results
    for key in dotted.split("."):
        assert isinstance(value, dict) and key in value, f"{dotted}: {key!r} missing"
        value = value[key]
    return value


@pytest.mark.slow
def test_benchmark_runs_every_stage_and_writes_the_figures(tmp_path):
    out = tmp_path / "results.json"
    # --tiny: the --quick code paths (SFTTrainer, RewardTrainer, PPOTrainer and their bare loops) on a smaller model
    # with fewer repetitions, to keep the test short.
    proc = run_script("benchmarks/run.py", "--tiny", "--output", out, "--work_dir", tmp_path / "work", timeout=600)
    results = json.loads(out.read_text())
    for key in REQUIRED:
        value = _get(results, key)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key} = {value!r}"
    assert results["ppo"]["config"]["response_length"] > 0
    for stage in ("sft", "rm", "ppo"):
        assert 0.5 < results[stage]["ratio_to_bare"] < 3.0, (stage, results[stage]["ratio_to_bare"])
    assert results["environment"]["device"]
    for stage in ("SFT", "RM", "PPO"):
        assert stage in proc.stdout  # the table
    assert "ratio" in proc.stdout
