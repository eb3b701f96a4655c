"""The pipeline's summary: ``summary.json``, ``report.md`` and plots from the stage folders of one pipeline run.

    python -m common.report runs/pipeline --seconds_per_stage '{"sft": 40.1, ...}'

Expects the layout ``scripts/run_pipeline.sh`` writes under its output root: ``sft/``, ``sft_merged/``, ``rm/``,
``rm_merged/``, ``ppo/`` and ``final/``. The side-by-side answers are sampled (temperature 1, fixed seed) from the
SFT model and the final model for the same held-out questions, and scored by the reward model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from common.outputs import read_metrics


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(root: str, seconds_per_stage: dict | None = None) -> dict:
    """The headline numbers of a pipeline run, read from each stage's metrics.jsonl and reports."""
    sft = read_metrics(os.path.join(root, "sft"))
    evals = [m["eval_loss"] for m in sft if m.get("eval_loss") is not None]
    rm_report_path = os.path.join(root, "rm", "eval_report.json")
    rm_report = json.load(open(rm_report_path, encoding="utf-8")) if os.path.isfile(rm_report_path) else {}
    ppo = [m for m in read_metrics(os.path.join(root, "ppo")) if m.get("objective/scores") is not None]
    fifth = max(1, len(ppo) // 5)
    return {
        "sft_eval_loss_before": evals[0] if evals else None,
        "sft_eval_loss_after": evals[-1] if evals else None,
        "rm_eval_accuracy": rm_report.get("accuracy"),
        "rm_ece": rm_report.get("ece"),
        "ppo_steps": len(ppo),
        "ppo_score_first": _mean([m["objective/scores"] for m in ppo[:fifth]]),
        "ppo_score_last": _mean([m["objective/scores"] for m in ppo[-fifth:]]),
        "ppo_kl_last": ppo[-1]["objective/kl"] if ppo else None,
        "ppo_kl_max": max((m["objective/kl"] for m in ppo), default=None),
        "ppo_kl_coef_last": ppo[-1]["objective/kl_coef"] if ppo else None,
        "seconds_per_stage": seconds_per_stage or {},
    }


@torch.no_grad()
def side_by_side(root: str, questions: list[str], max_new_tokens: int = 48, seed: int = 0) -> list[dict]:
    """Answers of the SFT model and of the final model to the same questions, with reward-model scores."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from common.prompts import format_example, format_prompt
    from common.reward import score_texts

    rm_tok = AutoTokenizer.from_pretrained(os.path.join(root, "rm_merged"))
    rm_tok.pad_token = rm_tok.pad_token or rm_tok.eos_token
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(root, "rm_merged")).eval()
    rows = [{"question": q} for q in questions]
    for name in ("sft_merged", "final"):
        tok = AutoTokenizer.from_pretrained(os.path.join(root, name), padding_side="left")
        tok.pad_token = tok.pad_token or tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(os.path.join(root, name)).eval()
        torch.manual_seed(seed)
        batch = tok([format_prompt(q) for q in questions], return_tensors="pt", padding=True)
        out = model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = score_texts(rm, rm_tok, [format_example(q, a) for q, a in zip(questions, answers)]).tolist()
        for row, answer, score in zip(rows, answers, scores):
            row[name] = {"answer": answer, "score": score}
    return rows


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(root: str, summary: dict, answers: list[dict], plots: list[str]) -> str:
    s = summary
    lines = [
        "# RLHF pipeline report", "",
        "| stage | figure | value |", "| --- | --- | --- |",
        f"| SFT | eval loss before -> after | {_fmt(s['sft_eval_loss_before'])} -> {_fmt(s['sft_eval_loss_after'])} |",
        f"| reward model | eval accuracy (ECE) | {_fmt(s['rm_eval_accuracy'])} ({_fmt(s['rm_ece'])}) |",
        f"| PPO | mean score, first -> last fifth of {s['ppo_steps']} steps | {_fmt(s['ppo_score_first'])} -> "
        f"{_fmt(s['ppo_score_last'])} |",
        f"| PPO | KL to the SFT model, last step (max) | {_fmt(s['ppo_kl_last'])} ({_fmt(s['ppo_kl_max'])}) |",
        "", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds_per_stage"].items()), "",
        "## The same held-out questions, before and after PPO", "",
        "Sampled at temperature 1 with the same seed; scores are the reward model's.", "",
    ]
    for i, row in enumerate(answers, 1):
        lines += [f"### {i}. {row['question']}", "",
                  "| SFT model | after PPO |", "| --- | --- |",
                  f"| {_cell(row['sft_merged']['answer'])} | {_cell(row['final']['answer'])} |",
                  f"| score {row['sft_merged']['score']:.3f} | score {row['final']['score']:.3f} |", ""]
    lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    path = os.path.join(root, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>").strip() or "(empty)"


def held_out_questions(data_file: str, n: int = 3) -> list[str]:
    """The first ``n`` questions of the evaluation split: never trained on by SFT, the reward model or PPO."""
    with open(data_file, encoding="utf-8") as f:
        return [json.loads(line)["question"] for line, _ in zip(f, range(n))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--seconds_per_stage", default="{}", help="JSON object of stage -> seconds")
    parser.add_argument("--questions_file", default="data/evaluation/train.jsonl")
    parser.add_argument("--num_questions", type=int, default=3)
    args = parser.parse_args(argv)
    from common.plots import plot_pipeline

    summary = summarize(args.root, json.loads(args.seconds_per_stage))
    with open(os.path.join(args.root, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    plots = plot_pipeline(args.root)
    answers = side_by_side(args.root, held_out_questions(args.questions_file, args.num_questions))
    with open(os.path.join(args.root, "answers.json"), "w", encoding="utf-8") as f:
        json.dump(answers, f, indent=2, ensure_ascii=False)
    write_report(args.root, summary, answers, plots)
    print_summary(summary, answers)
    return summary


def print_summary(s: dict, answers: list[dict]) -> None:
    ok = lambda cond: "yes" if cond else "NO"  # noqa: E731
    learned_sft = s["sft_eval_loss_after"] is not None and s["sft_eval_loss_after"] < s["sft_eval_loss_before"]
    learned_ppo = s["ppo_score_last"] is not None and s["ppo_score_last"] > s["ppo_score_first"]
    print(
        "\n================ RLHF pipeline summary ================\n"
        f"SFT           eval loss {_fmt(s['sft_eval_loss_before'])} -> {_fmt(s['sft_eval_loss_after'])}   "
        f"fell: {ok(learned_sft)}\n"
        f"reward model  eval accuracy {_fmt(s['rm_eval_accuracy'])}   "
        f">= 0.9: {ok((s['rm_eval_accuracy'] or 0) >= 0.9)}\n"
        f"PPO           score {_fmt(s['ppo_score_first'])} -> {_fmt(s['ppo_score_last'])} (first -> last fifth)   "
        f"rose: {ok(learned_ppo)}\n"
        f"              KL last {_fmt(s['ppo_kl_last'])}, max {_fmt(s['ppo_kl_max'])}, "
        f"kl_coef {_fmt(s['ppo_kl_coef_last'])}\n"
        f"time          " + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds_per_stage"].items()) + "\n"
        "========================================================", file=sys.stdout,
    )
    if answers:
        row = answers[0]
        print(f"\nQ: {row['question']}\n"
              f"SFT   ({row['sft_merged']['score']:+.2f}): {row['sft_merged']['answer'][:160]!r}\n"
              f"final ({row['final']['score']:+.2f}): {row['final']['answer'][:160]!r}")


if __name__ == "__main__":
    main()
