"""benchmarks/run.py runs end to end and writes its figures. Not a timed test: it checks the figures are finite and
that each stage's ratio to the bare loop is sane (ours no worse than half the bare loop's speed, and not several
times faster, which would mean the two sides do different work); the table and JSON are for people."""

import contextlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys

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
    """benchmarks/NAME.py as a module: the scripts are not a package, they run as `python benchmarks/NAME.py`, which
    puts benchmarks/ on sys.path (their first import is benchmarks/_setup.py)."""
    folder = os.path.join(ROOT, "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
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
    assert results["ppo"]["config"]["response_length"] == 8  # the tiny profile's, EOS suppressed
    sft = results["sft"]
    assert sft["ours"]["tokens_per_s"] == pytest.approx(4 * 128 / sft["ours"]["median_s"])  # batch 4 x 128 tokens
    assert results["ppo"]["peak_rss_over_weights"] == pytest.approx(
        results["ppo"]["peak_rss_bytes"] / results["ppo"]["weight_bytes"])
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

    def verdict(interval: dict, null: float, above: str, below: str) -> str:  # of evaluate.py's bootstrap interval
        return above if interval["low"] > null else below if interval["high"] < null else "no clear change"

    for method, e in table.items():
        # one seed: each figure is that seed's, as evaluate.py and the run's own measures give it
        vs_sft = evaluated["models"][method]["vs_baseline"]
        assert e["win_rate_gold"]["mean"] == vs_sft["win_rate_gold"]["mean"], method
        assert e["win_verdicts"] == [verdict(vs_sft["win_rate_gold"], 0.5, "better", "worse")], method
        assert e["reward_verdicts"] == [verdict(vs_sft["reward_difference"], 0.0, "rose", "fell")], method
        run, ppo = runs[method], runs["ppo"]
        assert e["speed_vs_ppo"]["mean"] == pytest.approx(run["episodes_per_s"] / ppo["episodes_per_s"]), method
        assert e["memory_vs_ppo"]["mean"] == pytest.approx(run["peak_rss_bytes"] / ppo["peak_rss_bytes"]), method
        assert e["peak_rss_gib"]["mean"] == pytest.approx(run["peak_rss_bytes"] / 2**30)
        assert e["peak_rss_gib"]["mean"] > 0.05, method  # Python and torch alone hold more: bytes, not KiB
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
        assert results[side]["median_step_s"] == statistics.median(run["step_s"])
        assert results[side]["episodes_per_s"] == pytest.approx(16 / run["step_s"][0])  # 4 prompts x 4 answers
        assert results[side]["peak_rss_bytes"] == run["peak_rss_bytes"] > 2**27
    assert results["runs"]["trl"][0]["lengths"] == [6.0, 6.0]  # EOS suppressed: every answer 6 tokens, as ours
    ours, trl = results["ours"], results["trl"]
    assert results["trl_over_ours_step_time"] == pytest.approx(trl["median_step_s"] / ours["median_step_s"])
    assert results["trl_over_ours_peak_memory"] == pytest.approx(trl["peak_rss_bytes"] / ours["peak_rss_bytes"])
    assert results["trl_over_ours_step_time"] < 100 and results["trl_over_ours_peak_memory"] < 10
    assert "TRL / ours" in proc.stdout


def test_grpo_vs_trl_scoring_check_scores_both_texts_of_the_held_out_pairs(tiny_model, tmp_path, monkeypatch):
    """The text check: held-out pairs scored as our PPO scores them and as TRL's GRPOTrainer would; the texts
    differ (TRL's has no BOS), so the scores do too. Every figure is the one the reward model's own outputs give:
    they are recorded as it scores our chosen, our rejected, TRL's chosen and TRL's rejected texts, in that order."""
    import argparse

    import torch
    from test_ppo import _save_reward_model

    import common.modeling

    module = _load_benchmark("grpo_vs_trl")
    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    outputs, load_model = [], common.modeling.load_model

    def recording_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.register_forward_hook(lambda m, i, out: outputs.append(out.logits[:, 0].float()))
        return model

    monkeypatch.setattr(common.modeling, "load_model", recording_load_model)
    r = module.scoring_check(argparse.Namespace(reward_model=rm, pairs=48))
    assert r["pairs"] == 48
    scores = torch.cat(outputs)
    assert scores.shape == (4 * 48,)
    ours_j, ours_k, trl_j, trl_k = scores.split(48)
    assert r["ours"]["accuracy"] == pytest.approx((ours_j > ours_k).float().mean().item(), abs=1e-6)
    assert r["trl"]["accuracy"] == pytest.approx((trl_j > trl_k).float().mean().item(), abs=1e-6)
    x, y = torch.cat([ours_j, ours_k]), torch.cat([trl_j, trl_k])
    assert r["mean_abs_difference"] == pytest.approx((x - y).abs().mean().item(), abs=1e-6)
    assert r["mean_abs_difference"] > 1e-4  # the texts differ
    assert r["pearson"] == pytest.approx(torch.corrcoef(torch.stack([x, y]))[0, 1].item(), abs=1e-6)
    assert r["score_std_ours"] == pytest.approx(x.std().item(), abs=1e-6)


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
        table = vc.ceilings(perfect, scores, lam)  # answers of 3 to 39 tokens: every position bucket has some
        assert list(table) == ["all", "0-7", "8-15", "16-31", "32+"]
        assert all(abs(v - 1.0) < 1e-6 for v in table.values()), table  # NaN fails too
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
    three rows and the learned critics' table. Answers of at most 4 tokens: every position is in the bucket 0-7, so
    its figure is the one over all tokens and the later buckets have none (nan); the critics' figures are finite."""
    import re

    from test_ppo import _save_reward_model

    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    proc = run_script("benchmarks/value_ceiling.py", "--model", tiny_model, "--reward_model", rm, "--prompts", "3",
                      "--continuations", "2", "--max_new_tokens", "4", "--critics", "16", "--epochs", "2",
                      timeout=600)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 7, proc.stdout  # two headers, three perfect-critic rows, two critics
    assert rows[0].split(" | ")[1:] == ["all", "positions 0-7", "positions 8-15", "positions 16-31", "positions 32+ |"]
    for line in rows[1:4]:
        every, first, *later = re.findall(r"\| (-?\d+\.\d+|nan)", line)
        assert every == first != "nan" and later == ["nan"] * 3, line
    for line in rows[5:]:
        figures = [float(x) for x in re.findall(r"\| (-?\d+\.\d+|nan)", line)]
        assert len(figures) == 3 and all(math.isfinite(x) for x in figures), line
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


def test_patched_puts_back_class_module_and_instance_attributes_also_on_error():
    """benchmarks/_setup.py ``patched``: a class's own method, a module's function and an attribute an instance only
    inherited are replaced inside the block and are what they were after it, whether the block ends or raises."""
    import types

    patched = _load_benchmark("_setup").patched

    class Base:
        def backward(self):
            return "class"

    module, obj = types.ModuleType("m"), Base()
    module.forward = original = lambda: "module"
    for fail in (False, True):
        with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
            with patched((Base, "backward", lambda self: "patched"), (module, "forward", lambda: "patched"),
                         (obj, "backward", lambda: "instance")):
                assert (Base().backward(), module.forward(), obj.backward()) == ("patched", "patched", "instance")
                if fail:
                    raise RuntimeError("the run failed")
        assert (Base().backward(), module.forward(), obj.backward()) == ("class", "module", "class")
        assert module.forward is original and "backward" not in vars(obj)


@pytest.mark.parametrize("name", ["ppo_vs_trl", "profile_ppo_step"])
def test_timing_wrappers_come_off_after_the_run(name):
    """The methods that benchmarks/ppo_vs_trl.py (phase timers, step clock, no EOS) and profile_ppo_step.py (profiler
    labels) wrap on PPOTrainer and accelerate's classes are wrapped for the run only: the same functions before and
    after it, also after a run that raised."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from common.ppo import PPOTrainer

    module = _load_benchmark(name)
    owners = {"PPOTrainer": PPOTrainer, "Accelerator": Accelerator, "AcceleratedOptimizer": AcceleratedOptimizer}
    wrapped = {("PPOTrainer", m) for m in ("generate", "score", "update", "reference_and_values", "forward")}
    wrapped |= {("Accelerator", "backward"), ("Accelerator", "clip_grad_norm_"), ("AcceleratedOptimizer", "step")}
    if name == "ppo_vs_trl":
        wrapped |= {("PPOTrainer", m) for m in ("collate", "step", "save_model", "__init__")}

        def block():
            timer = module.PhaseTimer()
            return module.timed_trainer(timer, module.StepClock(timer, gated=False), [])
    else:
        block = module.mark_phases
    before = {k: dict(vars(c)) for k, c in owners.items()}
    for fail in (False, True):
        with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
            with block():
                inside = {k: dict(vars(c)) for k, c in owners.items()}
                assert {(k, m) for k, d in inside.items() for m in d if d[m] is not before[k].get(m)} == wrapped
                if fail:
                    raise RuntimeError("the run failed")
        assert {k: dict(vars(c)) for k, c in owners.items()} == before
