"""benchmarks/run.py runs end to end and writes its figures. Not a timed test: it checks the figures are finite and
that each stage's ratio to the bare loop is sane (ours no worse than half the bare loop's speed, and not several
times faster, which would mean the two sides do different work); the table and JSON are for people."""

import json
import math
import shutil

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


@pytest.mark.slow
def test_compare_methods_trains_each_method_evaluates_them_together_and_resumes(tiny_model, tmp_path):
    """benchmarks/compare_methods.py on the tiny model: PPO and GRPO for the same episodes, DPO for PPO's
    training time, one evaluation of all against SFT, and a table with every method; a re-run trains nothing."""
    from test_ppo import _save_reward_model

    root = tmp_path / "root"
    shutil.copytree(tiny_model, root / "sft_merged")
    _save_reward_model(tiny_model, str(root / "rm"))
    out = tmp_path / "compare"
    # RLOO takes the same path through the benchmark as GRPO: left out to keep the test short.
    args = ["benchmarks/compare_methods.py", "--root", root, "--seeds", "1", "--output_dir", out,
            "--methods", "ppo", "grpo", "dpo", "--dpo_calibration_steps", "3",
            "--rl_args", "--steps 8 --batch_size 4 --mini_batch_size 2 --gradient_accumulation_steps 1 "
                         "--output_min_length 4 --output_max_length 8 --eval_freq 2 --eval_prompts 4 "
                         "--disable_tqdm true",
            "--dpo_args", "--train_subset 64 --eval_subset 8 --disable_tqdm true",
            "--eval_args", "--num_prompts 8 --max_new_tokens 8 --batch_size 8"]
    proc = run_script(*args, timeout=600)
    result = json.loads((out / "compare.json").read_text())
    runs = result["per_seed"]["1"]
    for method in ("ppo", "grpo"):
        assert runs[method]["steps"] == 2 and runs[method]["episodes"] == 8, (method, runs[method])
        assert (out / "seed1" / method / "adapter_config.json").is_file()
    # DPO trained for PPO's training time: as many steps as its calibrated speed fits in it, the time limit as a
    # guard (a run it cut short stopped past the budget).
    dpo = runs["dpo"]
    calibration = [json.loads(line) for line in (out / "dpo_calibration" / "metrics.jsonl").read_text().splitlines()]
    rate = calibration[-1]["step"] / calibration[-1]["train_runtime"]
    assert calibration[-1]["step"] == 3
    assert dpo["budget_s"] == pytest.approx(runs["ppo"]["train_s"], abs=0.001)
    assert dpo["planned_steps"] == max(1, int(dpo["budget_s"] * rate))
    # train_runtime starts before the limit's clock does (and is rounded to 0.1 ms): a cut run is past the budget
    assert dpo["steps"] == dpo["planned_steps"] or (dpo["steps"] < dpo["planned_steps"]
                                                    and dpo["train_s"] >= dpo["budget_s"] - 1e-3)
    evaluated = json.loads((out / "seed1" / "eval" / "eval.json").read_text())
    assert list(evaluated["models"]) == ["sft", "ppo", "grpo", "dpo"]
    assert evaluated["prompts"]["n"] == 8
    table = result["table"]
    assert list(table) == ["ppo", "grpo", "dpo"]
    assert table["ppo"]["speed_vs_ppo"]["mean"] == 1.0 and table["ppo"]["memory_vs_ppo"]["mean"] == 1.0
    for method, e in table.items():
        assert 0.0 <= e["win_rate_gold"]["mean"] <= 1.0
        assert len(e["win_verdicts"]) == 1 and e["win_verdicts"][0] in ("better", "worse", "no clear change")
        assert e["reward_verdicts"][0] in ("rose", "fell", "no clear change")
        assert e["peak_rss_gib"]["mean"] > 0.05 and e["speed_vs_ppo"]["mean"] > 0, method
        assert e["kl"] is not None and math.isfinite(e["kl"]["mean"])
    assert table["ppo"]["kl"]["mean"] != 0.0  # trained: the adapters moved away from SFT
    for method in ("| PPO |", "| GRPO |", "| DPO |"):
        assert method in proc.stdout
    again = run_script(*args, timeout=300)
    assert again.stdout.count("done already") == 5  # the DPO calibration too
    assert json.loads((out / "compare.json").read_text())["table"] == table


@pytest.mark.slow
def test_grpo_vs_trl_runs_both_sides_on_the_same_setup(tiny_model, tmp_path):
    """benchmarks/grpo_vs_trl.py, one round of one timed step: both sides train, generate answers of exactly the
    requested length, and report finite step times and peak memory."""
    from test_ppo import _save_reward_model

    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    out = tmp_path / "grpo_vs_trl.json"
    proc = run_script("benchmarks/grpo_vs_trl.py", "--model", tiny_model, "--reward_model", rm, "--rounds", "1",
                      "--steps", "1", "--warmup", "1", "--length", "6", "--output", out, timeout=600)
    results = json.loads(out.read_text())
    for side in ("ours", "trl"):
        (run,) = results["runs"][side]
        assert len(run["step_s"]) == 1 and len(run["scores"]) == 2, (side, run)
        assert all(math.isfinite(s) for s in run["scores"])
        assert results[side]["median_step_s"] > 0 and results[side]["peak_rss_bytes"] > 2**27
    assert results["runs"]["trl"][0]["lengths"] == [6.0, 6.0]  # EOS suppressed: every answer 6 tokens, as ours
    assert 0 < results["trl_over_ours_step_time"] < 100 and 0 < results["trl_over_ours_peak_memory"] < 10
    assert "TRL / ours" in proc.stdout


def test_grpo_vs_trl_scoring_check_scores_both_texts_of_the_held_out_pairs(tiny_model, tmp_path):
    """The text check: held-out pairs scored as our PPO scores them and as TRL's GRPOTrainer would; the texts
    differ (TRL's has no BOS), so the scores do too, and each accuracy is a share of the pairs."""
    import argparse
    import importlib.util

    from test_ppo import _save_reward_model

    spec = importlib.util.spec_from_file_location("grpo_vs_trl", "benchmarks/grpo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    r = module.scoring_check(argparse.Namespace(reward_model=rm, pairs=48))
    assert r["pairs"] == 48
    for side in ("ours", "trl"):
        assert 0.0 <= r[side]["accuracy"] <= 1.0 and r[side]["accuracy"] * r["pairs"] == pytest.approx(
            round(r[side]["accuracy"] * r["pairs"]), abs=1e-3)
    assert r["mean_abs_difference"] > 1e-4 and -1.0 <= r["pearson"] <= 1.0
