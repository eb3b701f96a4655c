"""What does the language model itself already know of the preferences? Likelihood rankings of preference pairs.

For each pair of ``--subset`` (stack-exchange-paired layout; the sample data's ``pair_kind`` groups the figures), the
model ranks the two answers by

- ``log p``: the log-probability of the answer (and its EOS) after the question's prompt, summed over tokens;
- ``per token``: the same divided by the answer's token count (no preference for short answers);
- ``PMI``: ``log p(answer | question) - log p(answer | empty question)``, how much the question raises the answer's
  probability: the part of the likelihood that is about relevance, not fluency.

Each is counted right when it ranks the preferred answer higher. Next to them, with ``--reward_model_report``, the
reward model's accuracy per kind from its ``eval_report.json``. A kind where every likelihood ranking is near 0.5
is one the model cannot tell apart by itself: a reward model trained from it has to learn that from the pairs.

    bash scripts/run_pipeline.sh
    python benchmarks/likelihood_pairs.py --model runs/pipeline/sft_merged \
        --reward_model_report runs/pipeline/rm/eval_report.json

Results on the pipeline's models are in benchmarks/README.md ("What the SFT model knows of the look-alike pairs").
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from _setup import ROOT  # first: the repository on sys.path, offline, passive OpenMP

RANKINGS = ("log p", "per token", "PMI")


def answer_logprobs(model, tokenizer, questions: list[str], answers: list[str], batch_size: int = 32):
    """(summed log-probs, token counts) of each answer and its EOS after ``format_prompt(question)``, tokenized as
    SFT tokenizes examples (``common.prompts.tokenize_example``)."""
    import torch

    from common.ppo_math import logprobs_from_logits
    from common.prompts import tokenize_example

    sums, counts = [], []
    pad = tokenizer.pad_token_id
    for start in range(0, len(questions), batch_size):
        examples = [tokenize_example(tokenizer, q, a)
                    for q, a in zip(questions[start : start + batch_size], answers[start : start + batch_size])]
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples])
        attn = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples])
        mask = torch.tensor([e["completion_mask"] + [0] * (width - len(e["input_ids"])) for e in examples])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        logp = logprobs_from_logits(logits, ids[:, 1:], 1.0) * mask[:, 1:]
        sums += logp.sum(1).tolist()
        counts += mask[:, 1:].sum(1).tolist()
    return sums, counts


def rankings(model, tokenizer, rows: list[dict]) -> dict[str, list[bool]]:
    """Per ranking, whether it puts each pair's preferred answer (``response_j``) above the rejected one."""
    questions = [r["question"] for r in rows]
    empty = [""] * len(rows)
    out = {}
    for side in ("response_j", "response_k"):
        answers = [r[side] for r in rows]
        given, n = answer_logprobs(model, tokenizer, questions, answers)
        alone, _ = answer_logprobs(model, tokenizer, empty, answers)
        out[side] = {"log p": given, "per token": [s / c for s, c in zip(given, n)],
                     "PMI": [g - a for g, a in zip(given, alone)]}
    return {name: [j > k for j, k in zip(out["response_j"][name], out["response_k"][name])] for name in RANKINGS}


def table(kinds: list[str], right: dict[str, list[bool]], rm_by_kind: dict | None) -> str:
    groups = defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[kind].append(i)
        groups["look-alike (all)" if kind.startswith("lookalike") else "other (all)"].append(i)
    groups["all pairs"] = list(range(len(kinds)))
    head = ["pair kind", "pairs", *RANKINGS] + (["reward model"] if rm_by_kind is not None else [])
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for kind in sorted(k for k in groups if "(all)" not in k and k != "all pairs") + \
            [k for k in ("look-alike (all)", "other (all)", "all pairs") if k in groups]:
        idx = groups[kind]
        cells = [kind, str(len(idx))] + [f"{sum(right[name][i] for i in idx) / len(idx):.3f}" for name in RANKINGS]
        if rm_by_kind is not None:
            rm = rm_by_kind.get(kind)
            cells.append(f"{rm:.3f}" if rm is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a causal LM folder (e.g. the pipeline's sft_merged)")
    p.add_argument("--dataset_name", default=ROOT)
    p.add_argument("--subset", default="data/evaluation")
    p.add_argument("--reward_model_report", default=None, help="a reward model's eval_report.json, shown alongside")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from common.data import load_and_validate
    from common.modeling import load_tokenizer

    rows = list(load_and_validate(args.dataset_name, args.subset, "train",
                                  ["question", "response_j", "response_k"]).dataset)
    kinds = [r.get("pair_kind") or "pairs" for r in rows]
    rm_by_kind = None
    if args.reward_model_report:
        with open(args.reward_model_report, encoding="utf-8") as f:
            report = json.load(f)
        rm_by_kind = {k: v["accuracy"] for k, v in (report.get("accuracy_by_kind") or {}).items()}
        rm_by_kind.update({"look-alike (all)": report.get("accuracy_lookalike"), "all pairs": report.get("accuracy")})
    tokenizer = load_tokenizer(args.model, False, "right")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    right = rankings(model, tokenizer, rows)
    print(f"{len(rows)} pairs of {args.subset}; share of pairs each ranking puts the preferred answer first\n")
    print(table(kinds, right, rm_by_kind))


if __name__ == "__main__":
    main()
