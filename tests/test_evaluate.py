"""evaluate.py on tiny random models: what it reports must agree with its own per-prompt rows, with common/gold.py
and with the identities that hold by construction (a model against itself: KL 0, win rate 1/2; best-of-n proxy
non-decreasing in n). The models are random, so their answers are noise: the figures are checked for consistency,
not for quality."""

import json
import math
import os

import pytest
import yaml
from test_ppo import _save_reward_model

from common import gold, stats
from common.cli import run
from common.gold import answer_key, gold_score, judge
from conftest import assert_user_error, run_script

FAST = {"num_prompts": 12, "max_new_tokens": 6, "batch_size": 4, "best_of_n": 4, "best_of_n_prompts": 4,
        "disable_tqdm": True}
FAST_FLAGS = [f"--{k}={v}" for k, v in FAST.items()]


def _random_model(tokenizer_source: str, out: str, seed: int) -> str:
    """Another random tiny Llama (smaller) with the tokenizer of ``tokenizer_source``: same ids, other weights."""
    from transformers import AutoTokenizer

    from common.tiny_model import build_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    build_model(tokenizer, hidden_size=128, num_layers=2, num_heads=4, seed=seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def paths(tiny_model, tmp_path_factory):
    """The tiny model, another random one with the same tokenizer, and a reward model."""
    root = tmp_path_factory.mktemp("eval_models")
    return {"tiny": tiny_model, "other": _random_model(tiny_model, str(root / "other"), seed=1),
            "rm": _save_reward_model(tiny_model, str(root / "rm"))}


@pytest.fixture(scope="module")
def results(paths):
    from evaluate import evaluate_models

    return evaluate_models(models=[f"a={paths['tiny']}", f"a2={paths['tiny']}", f"b={paths['other']}"],
                           reward_model_name=paths["rm"], **FAST)


def test_a_model_against_itself_has_kl_0_and_win_rate_one_half(results):
    assert results["settings"]["baseline"] == results["settings"]["reference"] == "a"
    for name in ("a", "a2"):  # a2 is the same folder loaded again: same answers, same scores, same log-probs
        m = results["models"][name]
        assert m["kl"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 12}
        assert all(row["answers"][name]["kl"] == 0.0 for row in results["rows"])
        for key in ("win_rate_reward", "win_rate_gold"):
            assert (m["vs_baseline"][key]["mean"], m["vs_baseline"][key]["low"], m["vs_baseline"][key]["high"]) == \
                (0.5, 0.5, 0.5)
            assert m["vs_baseline"][key]["verdict"] == "no clear change"
        assert m["vs_baseline"]["reward_difference"]["mean"] == 0.0
    assert [r["answers"]["a"]["answer"] for r in results["rows"]] == \
        [r["answers"]["a2"]["answer"] for r in results["rows"]]
    b = results["models"]["b"]
    assert b["kl"] is not None and b["kl"]["mean"] != 0.0 and b["kl_note"] is None  # another model, same tokenizer


def test_rows_agree_with_the_aggregates(results):
    rows = results["rows"]
    assert len(rows) == results["prompts"]["n"] == 12
    keyed = [r for r in rows if r["has_answer_key"]]
    for name, m in results["models"].items():
        answers = [r["answers"][name] for r in rows]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        assert m["reward"]["mean"] == pytest.approx(mean([a["reward"] for a in answers]), abs=1e-12)
        assert m["length"]["mean"] == pytest.approx(mean([a["tokens"] for a in answers]), abs=1e-12)
        assert m["readable_share"]["mean"] == pytest.approx(mean([a["readable_share"] for a in answers]), abs=1e-12)
        assert m["eos_fraction"] == mean([float(a["ended"]) for a in answers])
        assert m["kl"]["mean"] == pytest.approx(mean([a["kl"] for a in answers]), abs=1e-9)
        assert m["gold"]["n"] == len(keyed)
        assert m["gold"]["mean"] == pytest.approx(mean([r["answers"][name]["gold"] for r in keyed]), abs=1e-12)
        for key, score in (("win_rate_reward", "reward"), ("win_rate_gold", "gold")):
            ours = [r["answers"][name] for r in keyed] if score == "gold" else answers
            base = [r["answers"]["a"] for r in keyed] if score == "gold" else [r["answers"]["a"] for r in rows]
            w = stats.wins([x[score] for x in ours], [y[score] for y in base],
                           [x["answer"] == y["answer"] for x, y in zip(ours, base)])
            assert m["vs_baseline"][key]["mean"] == pytest.approx(mean(w), abs=1e-12)
        for key in ("reward", "gold", "length", "kl"):
            assert m[key]["low"] <= m[key]["mean"] <= m[key]["high"]
        base = [r["answers"]["a"] for r in rows]
        for key, field in (("length_difference", "tokens"), ("readable_share_difference", "readable_share")):
            expected = mean([x[field] - y[field] for x, y in zip(answers, base)])
            assert m["vs_baseline"][key]["mean"] == pytest.approx(expected, abs=1e-12)


def test_gold_scores_are_those_of_common_gold(results):
    assert results["prompts"]["with_answer_key"] == 12  # every evaluation question has a key
    for row in results["rows"]:
        key = answer_key(row["question"])
        for a in row["answers"].values():
            assert a["gold"] == gold_score(row["question"], a["answer"], key)
    for p in results["best_of_n"]["rows"]:
        assert p["gold"] == [gold_score(p["question"], t, answer_key(p["question"])) for t in p["answers"]]


def test_the_gold_parts_are_the_judges_parts_of_each_answer(results):
    rows = [r for r in results["rows"] if r["has_answer_key"]]
    for name, m in results["models"].items():
        verdicts = [judge(r["question"], r["answers"][name]["answer"], answer_key(r["question"])) for r in rows]
        expected = {"fix": [v.fix for v in verdicts], "names": [v.names for v in verdicts],
                    "broken": [float(bool(v.forbidden)) for v in verdicts],
                    "code": [float(v.has_code) for v in verdicts],
                    "eos": [float(r["answers"][name]["ended"]) for r in rows]}
        assert list(m["gold_parts"]) == list(expected)
        for part, values in expected.items():
            assert m["gold_parts"][part]["n"] == len(rows)
            assert m["gold_parts"][part]["mean"] == pytest.approx(sum(values) / len(values), abs=1e-12), part


def test_best_of_n_proxy_never_falls_and_picks_the_best_of_the_first_n(results):
    bon = results["best_of_n"]
    assert bon["model"] == "a" and bon["n_max"] == 4 and bon["prompts"] == 4
    assert [c["n"] for c in bon["curve"]] == [1, 2, 4]
    proxy = [c["reward"]["mean"] for c in bon["curve"]]
    assert proxy == sorted(proxy)
    for c in bon["curve"]:
        n = c["n"]
        picks = [max(range(n), key=lambda j, p=p: (p["reward"][j], -j)) for p in bon["rows"]]
        assert c["reward"]["mean"] == pytest.approx(
            sum(p["reward"][j] for p, j in zip(bon["rows"], picks)) / len(picks), abs=1e-12)
        assert c["gold"]["mean"] == pytest.approx(
            sum(p["gold"][j] for p, j in zip(bon["rows"], picks)) / len(picks), abs=1e-12)
        assert c["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)  # KL of best-of-n sampling
    assert bon["reward_change"]["mean"] == pytest.approx(proxy[-1] - proxy[0], abs=1e-12)


def test_answers_do_not_depend_on_the_other_models(results, paths):
    from evaluate import evaluate_models

    alone = evaluate_models(models=[f"b={paths['other']}"], reward_model_name=paths["rm"], **{**FAST, "best_of_n": 0})
    assert alone["best_of_n"] is None
    for row, ref in zip(alone["rows"], results["rows"]):
        assert row["answers"]["b"]["answer"] == ref["answers"]["b"]["answer"]
        assert row["answers"]["b"]["reward"] == ref["answers"]["b"]["reward"]


def test_preferred_answers_beat_rejected_ones_under_gold():
    """The comparison on answers with known gold: the data's preferred answers against its rejected ones."""
    import evaluate

    with open(os.path.join(os.path.dirname(__file__), "..", "data", "evaluation", "train.jsonl")) as f:
        data = [json.loads(line) for line, _ in zip(f, range(30))]
    rows = [{"question": d["question"], "answer_key": d["answer_key"]} for d in data]
    a = evaluate.EvalArguments(bootstrap_resamples=500)

    def model(field):
        texts = [d[field] for d in data]
        verdicts = evaluate.gold_verdicts(rows, texts)
        return {"texts": texts, "gold": [v.score for v in verdicts], "verdicts": verdicts, "reward": [0.0] * 30,
                "tokens": [1] * 30, "readable": [1.0] * 30, "ended": [True] * 30, "kl": None, "kl_note": "n/a"}

    good, bad = model("response_j"), model("response_k")
    assert good["gold"] == [1.0] * 30 and all(g < 1.0 for g in bad["gold"])
    s = evaluate.summarize(good, bad, a)
    assert s["vs_baseline"]["win_rate_gold"]["mean"] == 1.0 and s["vs_baseline"]["win_rate_gold"]["verdict"] == "better"
    assert s["vs_baseline"]["gold_difference"]["verdict"] == "rose"
    assert s["vs_baseline"]["win_rate_reward"]["mean"] == 0.5  # equal reward everywhere: ties
    # The ceiling: the whole fix with the baseline's names, against the baseline's own scores (ties 1/2).
    ceilings = [gold.ceiling(v) for v in bad["verdicts"]]
    assert s["vs_baseline"]["win_rate_gold_ceiling"]["mean"] == pytest.approx(
        sum(1.0 if c > g else 0.5 for c, g in zip(ceilings, bad["gold"])) / 30, abs=1e-12)
    assert 0.5 < s["vs_baseline"]["win_rate_gold_ceiling"]["mean"] < 1.0  # wrong-names answers cannot be beaten
    assert evaluate.summarize(bad, good, a)["vs_baseline"]["win_rate_gold_ceiling"]["mean"] == 0.5  # all at 1.0
    # Preferred answers hold the whole fix and no broken marker; the rejected ones of broken pairs hold a marker.
    assert s["gold_parts"]["fix"]["mean"] == 1.0 and s["gold_parts"]["broken"]["mean"] == 0.0
    broken = [d["pair_kind"] == "lookalike_broken" for d in data]
    assert evaluate.summarize(bad, good, a)["gold_parts"]["broken"]["mean"] >= sum(broken) / 30 > 0


def _error(capsys, args, *needles):
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        run(lambda: evaluate.main(*evaluate.parse(args)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_bad_input_is_one_error_line(paths, tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "out")]
    models = ["--models", f"a={paths['tiny']}", f"b={paths['other']}"]
    rm = ["--reward_model_name", paths["rm"]]
    _error(capsys, [*models, *rm, "--baseline", "c", *out], "--baseline c", "a, b")
    _error(capsys, [*models, *rm, "--best_of_n_model", "z", *out], "--best_of_n_model z")
    _error(capsys, ["--models", f"a={tmp_path / 'missing'}", *rm, *out], "model a: --models", "missing: no such folder")
    _error(capsys, ["--models", f"a={paths['tiny']}", f"a={paths['other']}", *rm, *out], "given twice")
    _error(capsys, [*models, *out], "--reward_model_name is required")
    _error(capsys, [*models, *rm, "--temperature", "0", *out], "--temperature")
    _error(capsys, [*models, *rm, "--num_prompts", "many", *out], "--num_prompts")
    _error(capsys, [*models, "--reward_model_name", paths["tiny"], *FAST_FLAGS, *out], "not a reward model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "How?"}) + "\n" + json.dumps({"question": None}) + "\n")
    _error(capsys, [*models, *rm, "--dataset_name", str(bad), "--subset", "", *out], "'question'", "row 2")
    assert not os.path.exists(tmp_path / "out")  # nothing written for a refused run


def test_output_folder_checks_and_yaml_models(paths, tmp_path, capsys):
    import evaluate

    rm = ["--reward_model_name", paths["rm"]]
    # a folder holding a model would lose its model card
    _error(capsys, ["--models", paths["tiny"], *rm, "--output_dir", paths["other"]], "holds a model")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"models": {"sft": paths["tiny"], "final": paths["other"]},
                                      "reward_model_name": paths["rm"], "baseline": "final"}))
    (a,) = evaluate.parse(["--config", str(config), "--num_prompts", "5"])
    assert evaluate.check_args(a) == {"sft": paths["tiny"], "final": paths["other"]}
    assert a.baseline == "final" and a.num_prompts == 5
    # a plain path is named after its last folder; a Hub id holds a slash, a name never does
    assert evaluate.parse_models([paths["tiny"], "x=org/tiny-llama", "org/tiny-llama"]) == \
        {os.path.basename(paths["tiny"]): paths["tiny"], "x": "org/tiny-llama", "tiny-llama": "org/tiny-llama"}


@pytest.mark.slow
def test_cli_writes_the_results_folder(paths, tmp_path):
    from common.tiny_model import main as build

    other_vocab = build(["--output_dir", str(tmp_path / "other_vocab"), "--vocab_size", "1024", "--hidden_size", "128",
                         "--num_layers", "2", "--seed", "2"])  # another tokenizer: no KL to the reference
    out = str(tmp_path / "eval")
    args = ["evaluate.py", "--models", f"a={paths['tiny']}", f"c={other_vocab}",
            "--reward_model_name", paths["rm"], *FAST_FLAGS, "--output_dir", out]
    run_script(*args)
    assert {"eval.json", "eval.md", "models.png", "best_of_n.png", "run_args.yaml", "README.md"} <= set(os.listdir(out))
    results = json.load(open(os.path.join(out, "eval.json"), encoding="utf-8"))
    assert set(results) == {"settings", "prompts", "models", "best_of_n", "rows", "notes"}
    c = results["models"]["c"]
    assert c["kl"] is None and "tokenizers" in c["kl_note"] and c["reward"]["n"] == 12
    assert any("tokenizers" in n for n in results["notes"])
    md = open(os.path.join(out, "eval.md"), encoding="utf-8").read()
    assert "| a |" in md and "| c |" in md and "## Best of n" in md and "## Example answers" in md
    assert yaml.safe_load(open(os.path.join(out, "run_args.yaml")))["EvalArguments"]["models"] == args[2:4]
    # a second run into the same folder is refused unless asked
    assert_user_error(run_script(*args, check=False), "already holds eval.json", "--overwrite_output_dir")


def test_kl_log_probs_are_those_the_answers_were_sampled_with(paths):
    """The KL's forward (left-padded prompt, right-padded answer, logits_to_keep) gives each answer the log-prob
    ``generate`` sampled it with: no off-by-one between logits and tokens, padding ignored."""
    import torch

    import evaluate
    from common.generation import eos_token_ids, sample_responses
    from common.prompts import tokenize_prompt

    a = evaluate.EvalArguments(max_new_tokens=8, temperature=0.7)
    tokenizer, lm = evaluate.load_causal_lm(paths["tiny"], a)
    questions = [r["question"] for r in evaluate.load_questions(evaluate.EvalArguments(num_prompts=5))[0]]
    prompts = [tokenize_prompt(tokenizer, q) for q in questions]
    assert len(set(map(len, prompts))) > 1  # prompts of several lengths: left padding is exercised
    torch.manual_seed(0)
    answers, sampled = sample_responses(lm, prompts, 8, 0.7, eos_token_ids(tokenizer, lm),
                                        pad_id=tokenizer.pad_token_id,
                                        return_logprobs=True)
    ours = evaluate.sequence_logprobs(lm, prompts, answers, tokenizer.pad_token_id, 0.7, batch_size=2)
    assert ours == pytest.approx([sum(lp) for lp in sampled], abs=1e-4)  # 5e-6 seen: float32 rounding
    # answers of several lengths (as EOS cuts them): a prefix's log-prob does not depend on what follows it
    cut = [3, 8, 1, 5, 2]
    ours = evaluate.sequence_logprobs(lm, prompts, [r[:k] for r, k in zip(answers, cut)], tokenizer.pad_token_id,
                                      0.7, batch_size=5)
    assert ours == pytest.approx([sum(lp[:k]) for lp, k in zip(sampled, cut)], abs=1e-4)


@pytest.mark.parametrize("module", ["training_rl", "evaluate"])
def test_progress_bars_are_tqdm_auto_so_a_notebook_shows_widgets(module):
    import importlib

    import tqdm.auto

    assert importlib.import_module(module).tqdm is tqdm.auto.tqdm
