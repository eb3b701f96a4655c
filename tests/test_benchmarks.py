"""benchmarks/run.py runs end to end and writes its figures. Not a timed test: it checks the figures are finite and
that each stage's ratio to the bare loop is sane (ours no worse than half the bare loop's speed, and not several
times faster, which would mean the two sides do different work); the table and JSON are for people."""

import importlib.util
import json
import math
import os
import shutil

import pytest

from conftest import ROOT, run_script

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


def _load_benchmark(name: str):
    """benchmarks/NAME.py as a module: the scripts are not a package, they run as `python benchmarks/NAME.py`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    from test_ppo import _save_reward_model

    module = _load_benchmark("grpo_vs_trl")
    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    r = module.scoring_check(argparse.Namespace(reward_model=rm, pairs=48))
    assert r["pairs"] == 48
    for side in ("ours", "trl"):
        assert 0.0 <= r[side]["accuracy"] <= 1.0 and r[side]["accuracy"] * r["pairs"] == pytest.approx(
            round(r[side]["accuracy"] * r["pairs"]), abs=1e-3)
    assert r["mean_abs_difference"] > 1e-4 and -1.0 <= r["pearson"] <= 1.0


def test_value_ceiling_scores_perfect_constant_and_noisy_values_as_it_should():
    """The GAE figure is 1 when every completion of a prefix scores the answer's own score and 0 (lam 1) when every
    value is the same; the Monte Carlo figure is 1 when a prefix's completions all score alike and near 0 when they
    are independent of the prefix."""
    import torch

    vc = _load_benchmark("value_ceiling")
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(40, generator=gen)
    lengths = torch.randint(3, 40, (40,), generator=gen).tolist()
    perfect = [torch.full((n, 4), float(s)) for n, s in zip(lengths, scores)]
    for lam in (0.95, 1.0):
        table = vc.ceilings(perfect, scores, lam)
        assert all(abs(v - 1.0) < 1e-6 for v in table.values() if not math.isnan(v)), table
    constant = [torch.full((n, 4), 0.3) for n in lengths]
    assert abs(vc.ceilings(constant, scores, 1.0)["all"]) < 1e-6
    assert vc.monte_carlo_ceiling(perfect)["all"] == 1.0
    independent = [torch.randn(n, 8, generator=gen) for n in lengths]
    table = vc.monte_carlo_ceiling(independent)
    assert abs(table["all"]) < 0.05 and abs(table["0-7"]) < 0.1, table
    half = [torch.full((n, 8), float(s)) + torch.randn(n, 8, generator=gen) for n, s in zip(lengths, scores)]
    assert 0.3 < vc.monte_carlo_ceiling(half)["all"] < 0.7  # Var(V) ~ 1 of Var(G) ~ 2


@pytest.mark.slow
def test_value_ceiling_runs_on_the_tiny_model_and_prints_both_tables(tiny_model, tmp_path):
    """benchmarks/value_ceiling.py end to end with a few prompts and critics: the perfect-critic table with its
    three rows and the learned critics' table, every figure a number no larger than 1."""
    import re

    from test_ppo import _save_reward_model

    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    proc = run_script("benchmarks/value_ceiling.py", "--model", tiny_model, "--reward_model", rm, "--prompts", "3",
                      "--continuations", "2", "--max_new_tokens", "4", "--critics", "16", "--epochs", "2",
                      timeout=600)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 7, proc.stdout  # two headers, three perfect-critic rows, two critics
    for line in rows[1:4] + rows[5:]:
        figures = [float(x) for x in re.findall(r"\| (-?\d+\.\d+|nan)", line)]
        assert figures and all(math.isnan(x) or x <= 1.0 for x in figures), line
    assert len(re.findall(r"\d\.\d{3}", rows[5])) == 3  # untrained (calibrated), then one figure per epoch


def test_likelihood_pairs_scores_each_answer_as_one_unpadded_forward_does(tiny_model):
    """benchmarks/likelihood_pairs.py: answers of different lengths batched with padding get the summed log-prob of
    their tokens and EOS that a forward of each example alone gives; an answer paired with itself is never counted
    right; the table has a row per kind and the look-alike total."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.modeling import load_tokenizer
    from common.prompts import tokenize_example

    lp = _load_benchmark("likelihood_pairs")
    tok = load_tokenizer(tiny_model, False, "right")
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    questions = ["How do I list files?", "Why is my shell loop so slow on big folders?", "Quote a variable?"]
    answers = ["Use `ls -la`.", "Each iteration forks a process; use find with -exec ... + instead.", "Yes."]
    sums, counts = lp.answer_logprobs(model, tok, questions, answers)
    for q, a, s, n in zip(questions, answers, sums, counts):
        e = tokenize_example(tok, q, a)
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        start = e["completion_mask"].index(1)
        expected = logp[start - 1 :].gather(-1, ids[0, start:, None]).sum().item()
        assert abs(s - expected) < 1e-3 and n == len(e["input_ids"]) - start, (q, s, expected)
    rows = [{"question": q, "response_j": a, "response_k": a} for q, a in zip(questions, answers)]
    right = lp.rankings(model, tok, rows)
    assert right == {name: [False] * 3 for name in lp.RANKINGS}
    text = lp.table(["lookalike_a", "lookalike_b", "plain"], right, {"lookalike_a": 0.5})
    assert "| lookalike_a | 1 | 0.000 | 0.000 | 0.000 | 0.500 |" in text
    assert "| look-alike (all) | 2 |" in text and "| all pairs | 3 |" in text
