"""Tests for ``common.gold``: hand-written answers score as a reader would expect, and on the sample data every
preferred answer scores high and every rejected one lower. Pure Python, a few seconds."""

from __future__ import annotations

import collections
import importlib.util
import json
import os

import pytest

from common import gold
from common.gold import answer_key, contains, gold_score, judge, load_answer_keys, readable_share, vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------ hand-written questions

EXC_Q = ("How can I catch both `ValueError` and `KeyError` in one `except` clause when calling `process(items)`? "
         "Thanks in advance!")
EXC_KEY = {
    "topic": "python-exceptions", "template": 0,
    "fix": [["except (ValueError, KeyError)"], ["for item in", "except (ValueError, KeyError)"]],
    "names": ["process", "items"], "name_slots": ["func", "var"],
    "foreign_names": ["handle", "parse_record", "save_row", "validate", "records", "values", "users", "scores"],
    "forbidden": ["except ValueError or KeyError", "except ValueError, KeyError", "except ValueError and KeyError"],
    "code_langs": ["python"],
}
EXC_RIGHT = ("Pass a tuple of exception classes to `except`.\n\n```python\ntry:\n    result = process(items)\n"
             "except (ValueError, KeyError) as exc:\n    logger.warning(\"process failed: %s\", exc)\n"
             "    result = None\n```\n\n`as exc` binds whichever exception was raised, so you can log its message.")
EXC = {
    "right": EXC_RIGHT,
    "right_short": "Use a tuple.\n\n```python\ntry:\n    process(items)\nexcept (ValueError, KeyError) as exc:\n"
                   "    print(exc)\n```",
    "wrong_names": EXC_RIGHT.replace("process", "handle").replace("items", "records"),
    "wrong_fix": "Iterate over the file object itself inside a `with` block.\n\n```python\n"
                 "with open(\"data.txt\", encoding=\"utf-8\") as f:\n    for line in f:\n"
                 "        process(line.rstrip(\"\\n\"))\n```\n\n"
                 "The `with` block closes the file even if `process` raises.",
    "broken": EXC_RIGHT.replace("except (ValueError, KeyError) as exc:", "except ValueError or KeyError as exc:"),
    "dismissive": "Just google it, there are hundreds of answers about exception handling already.",
}

GIT_Q = ("I committed to `feature/login` by mistake and haven't pushed yet. How do I undo the last commit but keep "
         "my changes to `notes.md`?")
GIT_KEY = {
    "topic": "git-undo-commit", "template": 0,
    "fix": [["reset --soft HEAD~1"], ["git reset HEAD~1"]],
    "names": ["notes.md"], "name_slots": ["file"],
    "foreign_names": ["data.txt", "input.log", "access.log", "words.txt", "results.csv", "server.log"],
    "forbidden": ["reset --hard HEAD~1", "checkout HEAD~1", "HEAD~2"],
    "code_langs": ["bash"],
}
GIT_RIGHT = ("Use `git reset --soft HEAD~1`, which undoes the commit and keeps your changes staged.\n\n```bash\n"
             "git reset --soft HEAD~1\ngit status   # notes.md is still staged\n```\n\n`--soft` moves the branch "
             "pointer but leaves the index and working tree alone, so nothing is lost.")
GIT = {
    "right": GIT_RIGHT,
    "right_short": "Since it's not pushed, move the branch back.\n\n"
                   "```bash\ngit reset HEAD~1\ngit add -p notes.md\n```",
    "wrong_names": GIT_RIGHT.replace("notes.md", "server.log"),
    "wrong_fix": "Edit the conflicted file, remove the markers, then `git add` and commit.\n\n```bash\ngit status\n"
                 "# edit notes.md: keep the right lines, delete the <<<<<<< ======= >>>>>>> markers\n"
                 "git add notes.md\ngit commit\n```\n\n`git add` marks the file as resolved.",
    "broken": GIT_RIGHT.replace("git reset --soft HEAD~1\ngit status", "git reset --hard HEAD~1\ngit status"),
    "dismissive": "Everyone commits mistakes, I wouldn't worry about it. Read the documentation.",
}

SQL_Q = ("I want every row (with its `email`) from `customers` even when there is no matching row in `orders`. "
         "My INNER JOIN drops them. What join do I need?")
SQL_KEY = {
    "topic": "sql-left-join", "template": 0,
    "fix": [["LEFT JOIN", "ON"], ["LEFT JOIN", "COUNT(o.id)", "GROUP BY"]],
    "names": ["customers", "orders"], "name_slots": ["table", "table2"],
    "foreign_names": ["authors", "books", "departments", "employees", "students", "enrollments"],
    "forbidden": ["INNER JOIN orders", "WHERE o.id IS NOT NULL", "COUNT(*)", "RIGHT JOIN orders"],
    "code_langs": ["sql"],
}
SQL_RIGHT = ("Use a `LEFT JOIN` from `customers` to `orders`.\n\n```sql\nSELECT t.id, t.email, o.id AS match_id\n"
             "FROM customers AS t\nLEFT JOIN orders AS o\n  ON o.customer_id = t.id;\n```\n\nAn INNER JOIN only "
             "returns rows that match on both sides, so unmatched rows are dropped.")
SQL = {
    "right": SQL_RIGHT,
    "right_short": "You need an outer join.\n\n```sql\nSELECT t.id, COUNT(o.id) AS n_orders\nFROM customers t\n"
                   "LEFT JOIN orders o ON o.customer_id = t.id\nGROUP BY t.id;\n```",
    "wrong_names": SQL_RIGHT.replace("customers", "authors").replace("orders", "books")
                            .replace("customer_id", "author_id"),
    "wrong_fix": "Filter the groups with `HAVING`, not `WHERE`.\n\n```sql\nSELECT customer_id, COUNT(*) AS n\n"
                 "FROM orders\nGROUP BY customer_id\nHAVING COUNT(*) > 3;\n```\n\n"
                 "`WHERE` filters rows before grouping.",
    "broken": SQL_RIGHT.replace("LEFT JOIN orders AS o", "INNER JOIN orders AS o"),
    "dismissive": "SQL joins are confusing, look at a Venn diagram. Hope that helps somehow.",
}

CASES = [(EXC_Q, EXC_KEY, EXC), (GIT_Q, GIT_KEY, GIT), (SQL_Q, SQL_KEY, SQL)]
IDS = ["python-exceptions", "git-undo-commit", "sql-left-join"]


def hacks(question: str, answers: dict) -> dict[str, str]:
    """Answers that game a judge without answering: fences, repetition, the question echoed, key terms alone."""
    right = answers["right"]
    code = right.split("```")[1]
    return {
        "lone_fence": "```",
        "lone_fence_with_language": "```python",
        "empty_fence": "```python\n```",
        "repeated_fences": "```\n```\n" * 6,
        "repeated_answer": "\n\n".join([right] * 3),
        "repeated_code_line": "```\n" + "\n".join([code.splitlines()[1]] * 10) + "\n```",
        "question_echoed": question,
        "question_echoed_in_fence": f"```\n{question}\n```",
        "question_echoed_twice": f"{question}\n\n{question}",
    }


def key_terms_only(key: dict, fenced: bool) -> str:
    text = " ".join(key["fix"][0] + key["names"])
    return f"```\n{text}\n```" if fenced else text


# ------------------------------------------------------------------------------ hand-written: absolute bands


@pytest.mark.parametrize("question, key, answers", CASES, ids=IDS)
def test_right_answers_score_near_one(question, key, answers):
    for kind in ("right", "right_short"):
        verdict = judge(question, answers[kind], key)
        assert verdict.score >= 0.95, (kind, verdict)
        assert verdict.reasons == (), (kind, verdict.reasons)


@pytest.mark.parametrize("question, key, answers", CASES, ids=IDS)
def test_wrong_in_substance_scores_clearly_lower(question, key, answers):
    wrong_names = judge(question, answers["wrong_names"], key)
    assert 0.2 <= wrong_names.score <= 0.45 and wrong_names.fix == 1.0 and wrong_names.names == 0.0, wrong_names
    wrong_fix = judge(question, answers["wrong_fix"], key)
    assert wrong_fix.score <= 0.25 and wrong_fix.fix <= 0.5, wrong_fix
    broken = judge(question, answers["broken"], key)
    assert broken.score <= 0.35 and broken.forbidden, broken


@pytest.mark.parametrize("question, key, answers", CASES, ids=IDS)
def test_dismissive_scores_near_zero(question, key, answers):
    assert gold_score(question, answers["dismissive"], key) <= 0.05


@pytest.mark.parametrize("question, key, answers", CASES, ids=IDS)
def test_hacks_score_near_zero(question, key, answers):
    for kind, answer in hacks(question, answers).items():
        limit = 0.2 if kind == "repeated_answer" else 0.05  # a repeated right answer keeps a little
        verdict = judge(question, answer, key)
        assert verdict.score <= limit, (kind, verdict)


@pytest.mark.parametrize("question, key, answers", CASES, ids=IDS)
def test_key_terms_without_prose_score_low(question, key, answers):
    right = gold_score(question, answers["right"], key)
    for fenced in (False, True):
        verdict = judge(question, key_terms_only(key, fenced), key)
        assert verdict.score <= 0.2 and verdict.score < right / 4, (fenced, verdict)


# ------------------------------------------------------------------------------ hand-written: orderings


@pytest.mark.parametrize("question, key, answers", CASES, ids=IDS)
def test_orderings(question, key, answers):
    s = {kind: gold_score(question, answer, key) for kind, answer in answers.items()}
    assert s["right"] > s["wrong_names"] > s["wrong_fix"] >= s["dismissive"]
    assert s["right"] > s["broken"] >= s["dismissive"]
    assert s["right_short"] > s["wrong_names"]


@pytest.mark.parametrize("question, key, answers", CASES, ids=IDS)
def test_echoed_question_earns_no_names(question, key, answers):
    """Names copied from an echoed question do not count: echo + wrong names is no better than wrong names."""
    echoed = judge(question, question + "\n\n" + answers["wrong_names"], key)
    assert echoed.names == 0.0
    assert echoed.score <= gold_score(question, answers["wrong_names"], key)
    # A right answer that also repeats the question loses part of its score, not all of it.
    assert (0.5 < gold_score(question, question + "\n\n" + answers["right"], key)
            < gold_score(question, answers["right"], key))


def test_mixing_the_questions_names_with_foreign_ones_gets_partial_credit():
    mixed = EXC_RIGHT.replace("result = process(items)", "result = handle(records)")
    verdict = judge(EXC_Q, mixed, EXC_KEY)
    assert verdict.foreign == ("handle", "records")
    assert gold_score(EXC_Q, EXC["wrong_names"], EXC_KEY) < verdict.score < gold_score(EXC_Q, EXC_RIGHT, EXC_KEY)


def test_forbidden_marker_quoted_from_the_question_in_prose_is_not_penalised():
    question = "I wrote `except ValueError or KeyError:` around `process(items)` but the KeyError is not caught. Why?"
    quoting = "`except ValueError or KeyError` evaluates to `except ValueError`. " + EXC_RIGHT
    assert judge(question, quoting, EXC_KEY).forbidden == ()
    assert judge(EXC_Q, quoting, EXC_KEY).forbidden == ("except ValueError or KeyError",)  # not in this question


def test_a_fix_named_only_in_prose_gets_partial_credit():
    prose = "Catch both with a tuple: write `except (ValueError, KeyError) as exc:` around `process(items)`."
    verdict = judge(EXC_Q, prose, EXC_KEY)
    assert not verdict.has_code and verdict.fix == gold.PROSE_TERM_CREDIT
    assert gold_score(EXC_Q, EXC["dismissive"], EXC_KEY) < verdict.score < gold_score(EXC_Q, EXC_RIGHT, EXC_KEY) / 2


def test_key_may_be_json_text_and_result_is_deterministic():
    as_text = json.dumps(EXC_KEY)
    assert judge(EXC_Q, EXC_RIGHT, as_text) == judge(EXC_Q, EXC_RIGHT, EXC_KEY)
    scores = {gold_score(EXC_Q, EXC["broken"], EXC_KEY) for _ in range(3)}
    assert len(scores) == 1
    with pytest.raises(ValueError):
        judge(EXC_Q, EXC_RIGHT, {"names": []})


def test_hand_written_keys_follow_the_generator_tables():
    spec = importlib.util.spec_from_file_location("sample_data_generate", os.path.join(ROOT, "data", "generate.py"))
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for _question, key, _answers in CASES:
        table = generate.KEYS[key["topic"]]
        assert all(alt in table["fix"] for alt in key["fix"])
        markers = [m for b in table["broken"] for m in b["markers"]]
        assert all(m in markers or any("[[" in x and m.split()[0] in x for x in markers) for m in key["forbidden"])


@pytest.mark.parametrize("text, term, expected", [
    ("git push --force-with-lease", "push --force", False),
    ("git push --force origin", "push --force", True),
    ("git reset --soft HEAD~10", "HEAD~1", False),
    ("git reset --soft HEAD~1\n", "reset --soft HEAD~1", True),
    ("async function loadUser() {", "User", True),
    ("SELECT COUNT(o.id) AS n_orders", "orders", True),
    ("for name in names:", "name", True),
    ("names = []", "name", False),
    ("except (ValueError,\n        KeyError)", "except (ValueError, KeyError)", True),
    ("JSON", "ON", False),
    ("grep -rli word dir", "grep -rl", False),
])
def test_contains_rule(text, term, expected):
    assert contains(text, term) is expected


# ------------------------------------------------------------------------------ the sample data


def rows(split: str) -> list[dict]:
    with open(os.path.join(ROOT, "data", split, "train.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_evaluation_preferred_answers_score_high_and_rejected_lower():
    """Every response_j scores >= 0.95; every response_k below its response_j, by pair kind (shares printed)."""
    by_kind = collections.defaultdict(list)
    for row in rows("evaluation"):
        j = gold_score(row["question"], row["response_j"], row["answer_key"])
        k = gold_score(row["question"], row["response_k"], row["answer_key"])
        assert j >= 0.95, (row["qid"], judge(row["question"], row["response_j"], row["answer_key"]))
        by_kind[row["pair_kind"]].append((j, k))
    for kind, pairs in sorted(by_kind.items()):
        wins = sum(j > k for j, k in pairs) / len(pairs)
        mean_k = sum(k for _, k in pairs) / len(pairs)
        print(f"{kind:<24} n={len(pairs):<4} gold(j) > gold(k): {wins:.1%}  mean gold(k) {mean_k:.3f}")
        assert wins == 1.0, kind
        if kind.startswith("lookalike_"):
            assert max(k for _, k in pairs) <= 0.5, kind
    assert {"lookalike_wrong_names", "lookalike_wrong_fix", "lookalike_broken"} <= set(by_kind)


def test_ceiling_keeps_the_answers_names_and_bounds_its_score():
    """gold.ceiling: 1 for a preferred answer (all names), 0.34 for the right fix with another question's names (the
    names share 0), and never below the answer's own score, over every answer of the evaluation split."""
    for row in rows("evaluation"):
        q, key = row["question"], row["answer_key"]
        for answer in (row["response_j"], row["response_k"]):
            v = judge(q, answer, key)
            assert v.score <= gold.ceiling(v) <= 1.0, (row["qid"], v)
        assert gold.ceiling(judge(q, row["response_j"], key)) == 1.0
        if row["pair_kind"] == "lookalike_wrong_names":
            v = judge(q, row["response_k"], key)
            assert v.names == 0 and gold.ceiling(v) == pytest.approx(0.34), (row["qid"], v)


def test_answer_keys_load_for_held_out_questions():
    keys = load_answer_keys()
    for split in ("evaluation", "rl"):
        for row in rows(split):
            assert keys[row["question"]] == row["answer_key"]
            assert answer_key(row["question"]) is keys[row["question"]]
    with pytest.raises(KeyError):
        answer_key("Not a question of the sample data?")


def test_vocabulary_and_readability():
    vocab = vocabulary()
    assert {"dict", "fromkeys", "items", "git", "reset", "the", "because"} <= vocab
    assert gold.words("dict.fromkeys(items) HEAD~1 don't") == ["dict", "fromkeys", "items", "head", "don", "t"]
    for row in rows("evaluation")[:50]:
        assert readable_share(row["response_j"], vocab) == 1.0
    assert readable_share("Use itemz frmkeys qzxv blorp", vocab) == 0.2
    assert readable_share("```\n```", vocab) == 0.0
