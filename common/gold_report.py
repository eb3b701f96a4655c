"""The sample report of a base model: its answers to the first questions of the ``evaluation`` split, greedy and
sampled, with their gold scores and readable shares (common/gold.py). The figures of assets/tiny-pretrained/README.md
come from it (``python -m common.tiny_model --pretrain --samples 50``). Evaluation code, kept out of the model builder
(common/tiny_model.py), which knows no judge: its command line calls ``sample_report`` for ``--samples``.
"""

from __future__ import annotations

import json
import os

import torch

from common.gold import DATA_DIR, judge, readable_share
from common.prompts import tokenize_prompt


def sample_report(model_dir: str, data_dir: str = DATA_DIR, n: int = 50, max_new_tokens: int = 200,
                  batch_size: int = 25, *, seed: int = 0, show: int = 0) -> dict:
    """Answers of the model in ``model_dir`` to the first ``n`` evaluation questions, greedy and sampled
    (temperature 1, no top-k/top-p, as PPO samples), with their gold scores (common/gold.py) and readable
    shares. Prints a summary and ``show`` answers of each kind; returns the figures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with open(os.path.join(data_dir, "evaluation", "train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n))]
    report = {}
    for mode in ("greedy", "sampled"):
        torch.manual_seed(seed)
        answers = []
        for start in range(0, len(rows), batch_size):
            prompts = [tokenize_prompt(tokenizer, r["question"]) for r in rows[start:start + batch_size]]
            width = max(map(len, prompts))
            ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                sampling = ({"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
                            if mode == "sampled" else {})
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **sampling,
                                     pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        verdicts = [judge(r["question"], a, r["answer_key"]) for r, a in zip(rows, answers)]
        gold = [v.score for v in verdicts]
        readable = [readable_share(a) for a in answers]
        figures = {
            "gold_mean": sum(gold) / len(gold),
            "gold_ge_0.9": sum(g >= 0.9 for g in gold) / len(gold),
            "gold_ge_0.5": sum(g >= 0.5 for g in gold) / len(gold),
            "gold_eq_0": sum(g == 0 for g in gold) / len(gold),
            "right_fix": sum(v.fix == 1 for v in verdicts) / len(verdicts),
            "all_names": sum(v.names == 1 for v in verdicts) / len(verdicts),
            "foreign_names": sum(bool(v.foreign) for v in verdicts) / len(verdicts),
            "readable_mean": sum(readable) / len(readable),
            "readable_ge_0.9": sum(r >= 0.9 for r in readable) / len(readable),
            "distinct_first_lines": len({a.strip().split("\n")[0] for a in answers}),
        }
        report[mode] = {"figures": figures, "answers": answers, "gold": gold, "readable": readable}
        print(f"{mode} ({len(rows)} evaluation questions): " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()), flush=True)
        for r, a, g, s in list(zip(rows, answers, gold, readable))[:show]:
            print(f"--- [{mode}] gold {g:.2f} readable {s:.2f}\nQ: {r['question']}\nA: {a}\n", flush=True)
    return report
