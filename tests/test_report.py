"""The pipeline summary's verdicts on fabricated stage folders: each says "rose"/"fell" only past the noise, and
"reward hacking" only when the reward-model score rose while the gold score fell."""

import json
import os
import random

import pytest

from common import report


def _answers(n, reward, gold, text):
    return {"texts": [text(i) for i in range(n)], "tokens": [20] * n, "ended": [True] * n,
            "reward": [reward(i) for i in range(n)], "gold": [gold(i) for i in range(n)],
            "readable": [0.95] * n, "kl": [0.0] * n, "kl_note": None, "verdicts": [None] * n}


def _pipeline(root, sft, final, scores=None, algo="ppo"):
    """A pipeline folder: SFT and RM results, PPO (or DPO) metrics and an eval.json made by evaluate.py's own
    summary."""
    from evaluate import EvalArguments, summarize

    os.makedirs(root / "sft")
    (root / "sft" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [
        {"step": 0, "eval_loss": 0.40}, {"step": 50, "eval_loss": 0.33}, {"step": 100, "eval_loss": 0.31}]))
    os.makedirs(root / "rm")
    (root / "rm" / "eval_report.json").write_text(json.dumps(
        {"accuracy": 0.9, "n_pairs": 400, "accuracy_lookalike": 0.86, "n_lookalike": 240, "ece": 0.05}))
    if algo == "dpo":
        os.makedirs(root / "dpo")
        (root / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [
            {"step": 0, "eval_loss": 0.693, "eval_rewards/margins": 0.0}, {"step": 10, "loss": 0.6},
            {"step": 20, "loss": 0.5}, {"step": 20, "eval_loss": 0.55, "eval_rewards/margins": 0.4}]))
        (root / "dpo" / "eval_report.json").write_text(json.dumps(
            {"accuracy": 0.8, "n_pairs": 200, "accuracy_lookalike": 0.7, "mean_margin": 0.4}))
        (root / "dpo" / "run_args.yaml").write_text("DPOConfig:\n  seed: 4\n")
    else:  # ppo, rloo, grpo: training_rl.py's metrics (RLOO and GRPO have no value head)
        os.makedirs(root / algo)
        scores = scores or [0.1 * i for i in range(20)]
        critic = {"val/explained_variance": 0.6} if algo == "ppo" else {}
        (root / algo / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": i + 1, "objective/scores": s, "objective/kl": 0.2 * i, "objective/kl_coef": 0.1, **critic})
            + "\n" for i, s in enumerate(scores)))
        if algo != "ppo":  # the PPO run here has none: the summary takes the seed it is given
            (root / algo / "run_args.yaml").write_text("PPOConfig:\n  seed: 5\n")
    a = EvalArguments(models=["sft=x", "final=y"], reward_model_name="rm", bootstrap_resamples=500)
    final["kl"] = [3.0] * len(final["kl"])
    ev = {"settings": {"models": {"sft": "x", "final": "y"}}, "prompts": {"n": len(sft["texts"])},
          "models": {"sft": summarize(sft, sft, a), "final": summarize(final, sft, a)}, "best_of_n": None,
          "rows": [{"question": f"q{i}", "has_answer_key": True,
                    "answers": {name: {"answer": m["texts"][i], "reward": m["reward"][i], "gold": m["gold"][i]}
                                for name, m in (("sft", sft), ("final", final))}} for i in range(len(sft["texts"]))]}
    os.makedirs(root / "eval")
    (root / "eval" / "eval.json").write_text(json.dumps(ev))
    return report.summarize(str(root), {"SFT": 60.0}, seed=3)


def _noise(seed):
    rng = random.Random(seed)
    return lambda i: rng.gauss(0, 1)


def test_better_answers_give_rose_and_the_summary_keys(tmp_path):
    n = 200
    sft = _answers(n, _noise(1), lambda i: 0.3, lambda i: f"sft {i}")
    final = _answers(n, lambda i: sft["reward"][i] + 1.0, lambda i: 0.3 + (0.4 if i % 4 else 0.0), lambda i: f"fin {i}")
    s = _pipeline(tmp_path, sft, final)
    for key in ("gold_win_rate_vs_sft", "gold_score_sft", "gold_score_final", "rm_score_rise_in_sft_std",
                "ppo_kl_to_sft", "rm_accuracy_lookalike", "sft_vocabulary_share", "seed"):
        assert s[key] is not None, key
    assert s["seed"] == 3 and s["rm_accuracy_lookalike"] == 0.86 and s["ppo_kl_to_sft"] == pytest.approx(3.0)
    assert s["gold_score_final"] == pytest.approx(0.3 + 0.4 * 0.75)
    assert s["gold_win_rate_vs_sft"] == pytest.approx(0.75 + 0.25 / 2)  # 3 of 4 better, the rest tied
    assert s["rm_score_rise_in_sft_std"] == pytest.approx(1.0 / report._std(sft["reward"]))
    assert s["gold_difference"]["verdict"] == "rose" and s["ppo_score_trend"]["verdict"] == "rose"
    text = "\n".join(report.summary_lines(s))
    assert "RLHF made the answers better" in text and "REWARD HACKING" not in text and "seed 3" in text


def test_a_dpo_pipeline_gives_a_summary_of_the_same_shape(tmp_path):
    n = 120
    sft = _answers(n, _noise(1), lambda i: 0.3, lambda i: f"sft {i}")
    final = _answers(n, lambda i: sft["reward"][i] + 1.0, lambda i: 0.3 + (0.4 if i % 4 else 0.0), lambda i: f"d {i}")
    s = _pipeline(tmp_path / "dpo_run", sft, final, algo="dpo")
    ppo = _pipeline(tmp_path / "ppo_run", sft, final)
    assert set(s) == set(ppo)  # the same keys whichever stage 3 ran
    assert s["algorithm"] == "dpo" and ppo["algorithm"] == "ppo" and s["seed"] == 4  # DPO's own run_args
    assert (s["dpo_steps"], s["dpo_eval_loss_first"], s["dpo_eval_loss_last"], s["dpo_eval_accuracy"],
            s["dpo_eval_accuracy_lookalike"]) == (20, 0.693, 0.55, 0.8, 0.7)
    assert s["ppo_steps"] == 0 and s["ppo_score_first"] is None and ppo["dpo_eval_accuracy"] is None
    assert s["gold_win_rate_vs_sft"] == ppo["gold_win_rate_vs_sft"]
    lines = "\n".join(report.summary_lines(s))
    assert "DPO training  eval loss 0.693 -> 0.550 in 20 steps" in lines and "PPO training" not in lines
    assert "look-alike ones" in lines and "gold wins" in lines


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_an_rloo_or_grpo_pipeline_gives_a_summary_of_the_same_shape_from_its_folder(tmp_path, algo):
    n = 120
    sft = _answers(n, _noise(1), lambda i: 0.3, lambda i: f"sft {i}")
    final = _answers(n, lambda i: sft["reward"][i] + 1.0, lambda i: 0.3 + (0.4 if i % 4 else 0.0), lambda i: f"r {i}")
    s = _pipeline(tmp_path / "run", sft, final, algo=algo)
    ppo = _pipeline(tmp_path / "ppo_run", sft, final)
    assert set(s) == set(ppo) and s["algorithm"] == algo and s["seed"] == 5  # the stage's own run_args
    assert s["ppo_steps"] == 20 and s["ppo_score_trend"]["verdict"] == "rose" and s["ppo_kl_last"] == pytest.approx(3.8)
    assert s["ppo_explained_variance_last"] is None  # no critic
    lines = "\n".join(report.summary_lines(s))
    assert f"{algo.upper()} training score 0.150 -> 1.750" in lines.replace("  ", " ") and "PPO" not in lines
    path = report.write_report(str(tmp_path / "run"), s, [], [])
    assert f"## Held-out questions during {algo.upper()}" not in open(path).read()  # none logged here


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_gives_no_clear_change(tmp_path, seed):
    n = 200
    sft = _answers(n, _noise(seed), _noise(seed + 10), lambda i: f"a {i}")
    final = _answers(n, _noise(seed + 20), _noise(seed + 30), lambda i: f"b {i}")
    steps = _noise(seed + 40)
    s = _pipeline(tmp_path, sft, final, scores=[steps(i) for i in range(20)])
    assert s["rm_score_difference"]["verdict"] == s["gold_difference"]["verdict"] == "no clear change"
    assert s["ppo_score_trend"]["verdict"] == "no clear change"
    assert "no clear change in answer quality" in "\n".join(report.summary_lines(s))


def test_proxy_up_and_gold_down_is_called_reward_hacking_with_the_repeated_answers(tmp_path):
    n = 120
    sft = _answers(n, _noise(5), lambda i: 0.5, lambda i: f"answer {i}")
    final = _answers(n, lambda i: sft["reward"][i] + 2.0, lambda i: 0.1,
                     lambda i: "Loop over a glob directly." if i % 3 else f"other {i}")
    s = _pipeline(tmp_path, sft, final)
    assert s["reward_hacking"] and s["rm_score_difference"]["verdict"] == "rose"
    assert s["gold_difference"]["verdict"] == "fell"
    assert s["most_repeated_final_answers"][0] == {"answer": "Loop over a glob directly.", "times": 80}
    text = "\n".join(report.summary_lines(s))
    assert "REWARD HACKING" in text and "80x 'Loop over a glob directly.'" in text


def test_seed_table_takes_the_worst_seed_and_names_a_missing_run(tmp_path, capsys):
    from common import seeds

    runs = []
    for seed, (minutes, share, acc, win, rise, kl) in enumerate(
            [(9.0, 0.99, 0.90, 0.70, 1.5, 3.0), (11.0, 0.95, 0.86, 0.66, 1.1, 8.0),
             (13.0, 0.97, 0.80, 0.60, 0.2, 12.0)]):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "seed": seed, "seconds_per_stage": {"SFT": minutes * 30, "PPO": minutes * 30},
            "sft_vocabulary_share": share, "sft_eos_share": share,
            "rm_accuracy_by_kind": {"lookalike_wrong_fix": acc, "lookalike_broken": acc + 0.05},
            "gold_win_rate_vs_sft": win, "gold_win_rate_ceiling": win - 0.02,
            "rm_score_rise_in_sft_std": rise, "ppo_kl_to_sft": kl}))
        runs.append(str(d))
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in
            seeds.main(runs[:2]).splitlines()[2:]}
    # Two good seeds: every target met; the worst is the max for time and KL, the min for the rest.
    assert rows["whole pipeline, minutes (2-core CPU)"][2:7] == ["9.0", "11.0", "10.0", "11.0", "yes |"]
    assert rows["gold win rate, final vs SFT"][2:7] == ["0.700", "0.660", "0.680", "0.660", "yes |"]
    assert rows["KL to the SFT model, nats"][5:7] == ["8.00", "yes |"]
    assert rows["gold win-rate ceiling without copying names"][2:7] == ["0.680", "0.640", "0.660", "0.640", "**no** |"]
    # A third seed below the bar fails every row it misses, whatever the mean says.
    text = seeds.main(runs)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()[2:]}
    assert rows["reward model accuracy, wrong-fix pairs"][6:8] == ["0.800", "**no** |"]
    assert rows["reward model accuracy, broken pairs"][6:8] == ["0.850", "yes |"]
    assert rows["SFT answers ended with EOS"][6:8] == ["0.95", "yes |"]
    assert rows["whole pipeline, minutes (2-core CPU)"][6:8] == ["13.0", "**no** |"]
    assert rows["SFT answers: share of corpus words"][6:8] == ["0.950", "yes |"]
    assert "| seed 0 | seed 1 | seed 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seed9.summary.json not found"):
        seeds.main([str(tmp_path / "seed9")])


def test_the_gold_parts_and_the_reward_models_kinds_reach_the_summary_and_the_report(tmp_path):
    from common.gold import Verdict

    def verdict(fix, names, broken, code):
        return Verdict(score=fix, fix=fix, names=names, has_code=code, forbidden=("x",) if broken else (),
                       foreign=(), echo=0.0, repetition=0.0, prose_words=5, terms_share=0.1, reasons=())

    n = 40
    sft = _answers(n, _noise(1), lambda i: 0.3, lambda i: f"sft {i}")
    final = _answers(n, lambda i: sft["reward"][i] + 1.0, lambda i: 0.6, lambda i: f"fin {i}")
    sft["verdicts"] = [verdict(0.5, 0.25, i % 2 == 0, True) for i in range(n)]
    final["verdicts"] = [verdict(1.0, 0.25, i % 4 == 0, True) for i in range(n)]
    sft["ended"] = [i % 10 != 0 for i in range(n)]  # 36 of 40
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "eval_report.json").write_text(json.dumps(
        {"accuracy": 0.9, "accuracy_by_kind": {"lookalike_broken": {"count": 80, "accuracy": 0.875},
                                               "dismissive": {"count": 30, "accuracy": 1.0}}}))
    os.rename(tmp_path / "rm", tmp_path / "rm_kept")
    s = _pipeline(tmp_path, sft, final)
    assert s["sft_eos_share"] == pytest.approx(0.9)
    assert s["gold_parts"]["sft"] == pytest.approx({"fix": 0.5, "names": 0.25, "broken": 0.5, "code": 1.0,
                                                    "eos": 0.9})
    assert s["gold_parts"]["final"]["fix"] == 1.0 and s["gold_parts"]["final"]["broken"] == 0.25
    lines = "\n".join(report.summary_lines(s))
    assert "fix 0.50 -> 1.00" in lines and "broken 0.50 -> 0.25" in lines and "ended with EOS: 0.90" in lines
    # Every SFT answer (gold 0.3, names 0.25) is below its ceiling 0.85 * (0.4 + 0.6 * 0.25) + 0.15 * 0.25 = 0.505.
    assert s["gold_win_rate_ceiling"] == 1.0 and "ceiling 1.00 without copying names" in lines
    report_text = open(report.write_report(str(tmp_path), s, [], [])).read()
    assert "| final | 1.000 | 0.250 | 0.250 | 1.000 | 1.000 |" in report_text
    assert "names than the SFT model's, would beat the SFT model in 1.000 of these questions" in report_text
    # The reward model's accuracy per kind of pair: the _pipeline helper wrote its own report, without kinds.
    assert s["rm_accuracy_by_kind"] == {}
    (tmp_path / "rm" / "eval_report.json").write_text((tmp_path / "rm_kept" / "eval_report.json").read_text())
    s = report.summarize(str(tmp_path))
    assert s["rm_accuracy_by_kind"] == {"lookalike_broken": 0.875, "dismissive": 1.0}
    assert "by kind     broken 0.88; 1 other kind 1.00" in "\n".join(report.summary_lines(s))
    assert report._kinds_text({"lookalike_wrong_fix": 0.6, "lookalike_broken": 0.75, "a": 1.0, "b": 0.95}) == \
        "wrong_fix 0.60, broken 0.75; 2 other kinds 0.95-1.00"


def test_the_best_of_n_table_prints_numbers_with_intervals(tmp_path):
    n = 40
    sft = _answers(n, _noise(1), lambda i: 0.3, lambda i: f"sft {i}")
    s = _pipeline(tmp_path, sft, _answers(n, _noise(2), lambda i: 0.3, lambda i: f"fin {i}"))
    s["best_of_n"] = {"model": "sft", "curve": [
        {"n": 1, "reward": {"mean": 0.17, "low": 0.05, "high": 0.3, "n": 32},
         "gold": {"mean": 0.21, "low": 0.15, "high": 0.27, "n": 32}}]}
    text = open(report.write_report(str(tmp_path), s, [], [])).read()
    assert "| 1 | 0.170 [0.050, 0.300] | 0.210 [0.150, 0.270] |" in text and "{" not in text.split("Best of n")[1]
