"""Tests of the sample data's content (``data/generate.py``): determinism, pair kinds and their shares, look-alike
pairs, the answer key column, the pretraining corpus. A few seconds."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
FILES = ["finetune", "reward", "evaluation", "rl", "pretrain"]
LOOKALIKE = ("lookalike_wrong_names", "lookalike_wrong_fix", "lookalike_broken")


def load_generator():
    spec = importlib.util.spec_from_file_location("sample_data_generate", os.path.join(DATA, "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return load_generator()


def rows(split: str) -> list[dict]:
    with open(os.path.join(DATA, split, "train.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_generate_is_deterministic_in_memory(gen):
    first, second = gen.generate(), gen.generate()
    assert first == second
    assert gen.pretrain_corpus(first, extra=50) == gen.pretrain_corpus(second, extra=50)


def test_committed_files_are_what_the_generator_writes(tmp_path):
    """A fresh process (another PYTHONHASHSEED) writes byte-identical files, equal to the committed ones."""
    env = dict(os.environ, PYTHONHASHSEED="12345")
    proc = subprocess.run([sys.executable, os.path.join(DATA, "generate.py"), "--out_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    for name in FILES:
        written = (tmp_path / name / "train.jsonl").read_bytes()
        with open(os.path.join(DATA, name, "train.jsonl"), "rb") as f:
            committed = f.read()
        assert hashlib.sha256(written).hexdigest() == hashlib.sha256(committed).hexdigest(), \
            f"data/{name}/train.jsonl is stale: run python data/generate.py"
    assert "look-alike pairs" in proc.stdout and "pretraining corpus" in proc.stdout


def test_committed_data_passes_the_generator_checks(gen):
    splits = {s: rows(s) for s in ("finetune", "reward", "evaluation", "rl")}
    gen.check(splits)
    gen.check_corpus(rows("pretrain"), splits)


@pytest.mark.parametrize("split", ["finetune", "reward", "evaluation", "rl"])
def test_pair_kinds_and_shares(split, gen):
    data = rows(split)
    kinds = [r["pair_kind"] for r in data]
    assert set(kinds) == set(gen.PAIR_KINDS)  # every kind, old and new, in every split
    lookalike = sum(k in LOOKALIKE for k in kinds) / len(kinds)
    assert lookalike >= 0.5
    for kind in LOOKALIKE:
        assert sum(k == kind for k in kinds) / len(kinds) >= 0.15, kind


@pytest.mark.parametrize("split", ["reward", "evaluation"])
def test_lookalike_pairs_look_alike(split):
    for r in rows(split):
        j, k = r["response_j"], r["response_k"]
        if r["pair_kind"] in LOOKALIKE:
            assert j.count("```") == k.count("```") == 2, r["qid"]
            assert 0.75 <= len(k) / len(j) <= 1.25, r["qid"]
        else:
            assert "```" in j and "```" not in k, r["qid"]
        assert len(r["question"]) + max(len(j), len(k)) <= 700


def test_answer_key_has_one_arrow_type():
    from common.data import load_split

    loaded = load_split(ROOT, "data/evaluation", "train")
    feature = loaded.dataset.features["answer_key"]
    assert set(feature) == {"topic", "template", "fix", "names", "name_slots", "foreign_names", "forbidden",
                            "code_langs"}
    assert loaded.dataset[0]["answer_key"] == rows("evaluation")[0]["answer_key"]


def test_pretraining_corpus_is_disjoint_from_held_out_questions(gen):
    docs = rows("pretrain")
    held_out = {r["question"] for s in ("evaluation", "rl") for r in rows(s)}
    questions = [gen.corpus_question(d["text"]) for d in docs]
    assert not held_out & set(questions)
    assert len(set(questions)) == len(questions)
    sources = {s: sum(d["source"] == s for d in docs) for s in ("finetune", "reward", "extra")}
    assert sources["finetune"] == sources["reward"] == 2000 and sources["extra"] >= 1000
    preferred = {r["question"]: r["response_j"] for s in ("finetune", "reward") for r in rows(s)}
    for doc, question in zip(docs, questions):
        if doc["source"] != "extra":
            assert doc["text"].endswith("\n\nAnswer: " + preferred[question])


def test_extra_reward_pairs_never_touch_the_sample_datas_questions_or_held_out_cores(gen, tmp_path):
    """``--extra_pairs N``: the sample pairs plus N new ones, none of which repeats a question of the sample data or
    fills a question template of the held-out splits (evaluation, rl) with the same values."""
    proc = subprocess.run([sys.executable, os.path.join(DATA, "generate.py"), "--extra_pairs", "300", "--out_dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "reward" / "train.jsonl", encoding="utf-8") as f:
        written = [json.loads(line) for line in f]
    sample = rows("reward")
    assert len(written) == len(sample) + 300
    sample_questions = {r["question"] for s in ("finetune", "reward", "evaluation", "rl") for r in rows(s)}
    new = [r for r in written if r["question"] not in sample_questions]
    assert len(new) == 300 and len({r["question"] for r in new}) == 300
    assert {r["question"] for r in written} - {r["question"] for r in new} == {r["question"] for r in sample}
    held_out_cores = {r["_core"] for s in ("evaluation", "rl") for r in gen.generate()[s]}
    assert {r["question"] for r in gen.extra_pairs(300)} == {r["question"] for r in new}  # deterministic
    cores = {r["_core"] for draw in (1, 2) for rows_ in gen.generate(gen.SEED + 1000 * draw).values() for r in rows_
             if r["question"] in {q["question"] for q in new}}
    assert cores and not cores & held_out_cores
    assert {r["pair_kind"] for r in new} >= set(LOOKALIKE)
    assert (tmp_path / "evaluation" / "train.jsonl").read_bytes() == open(
        os.path.join(DATA, "evaluation", "train.jsonl"), "rb").read()
