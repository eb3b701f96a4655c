"""How good is a reward model? The evaluation report of the reward-model stage (`eval_report.json` / `.md`), and
`reward_stats.json`, which PPO reads to normalise scores.

Everything is computed from the scores of preference pairs: ``r_j`` for the preferred answer, ``r_k`` for the
rejected one, and ``p = sigmoid(r_j - r_k)``, the model's probability that the preferred answer wins (the
Bradley-Terry reading of the loss ``-logsigmoid(r_j - r_k)``).
"""

from __future__ import annotations

import json
import math
import os

import torch

from common.reward import score_texts

# Edges of |r_j - r_k|, in score units: 0.5, 1, 2 and 4 are p = 0.62, 0.73, 0.88 and 0.98 for the model's pick.
MARGIN_EDGES = (0.0, 0.5, 1.0, 2.0, 4.0, math.inf)
N_BINS = 10
N_WORST = 5
SHOWN_CHARS = 300


def score_pairs(model, tokenizer, chosen: list[str], rejected: list[str], batch_size: int, *, accelerator=None):
    """Scores of the chosen and rejected texts, each ``[len(chosen)]`` float32 on CPU.

    Under several processes each scores an equal share (the last pair repeated to even them out, so every process
    runs the same number of forward passes, as sharded ZeRO-3 weights require) and the shares are gathered.
    """
    texts = chosen + rejected
    n, world = len(texts), accelerator.num_processes if accelerator else 1
    if world == 1:
        scores = score_texts(model, tokenizer, texts, batch_size)
    else:
        per = -(-n // world)
        rank = accelerator.process_index
        mine = (texts + texts[-1:] * (per * world - n))[rank * per : (rank + 1) * per]
        local = score_texts(model, tokenizer, mine, batch_size).to(accelerator.device)
        scores = accelerator.gather(local).cpu()[:n]
    return scores[: len(chosen)], scores[len(chosen) :]


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return None if len(x) < 2 or denom == 0 else float((x * y).sum() / denom)


def _stats(x: torch.Tensor) -> dict:
    """Mean and population std (what PPO divides by), and the count."""
    return {"mean": float(x.mean()), "std": float(x.std(unbiased=False)), "n": len(x)}


def calibration(p: torch.Tensor, n_bins: int = N_BINS) -> tuple[float, list[dict]]:
    """ECE of ``p = sigmoid(r_j - r_k)`` over ``n_bins`` equal-width bins of [0, 1], and the per-bin table.

    Which answer of a pair is called `j` is arbitrary, so each pair counts twice: as (p, preferred wins: 1) and as
    (1 - p, 0). Otherwise the outcome would always be 1 and "calibration" would only measure the margin. The
    table is symmetric: bin b mirrors bin n_bins-1-b. ECE = sum over bins of (share of predictions) * |observed -
    predicted| (Guo et al. 2017, "On Calibration of Modern Neural Networks").
    """
    probs = torch.cat([p, 1 - p]).double()
    wins = torch.cat([torch.ones_like(p), torch.zeros_like(p)]).double()
    index = (probs * n_bins).floor().clamp(0, n_bins - 1).long()
    table, ece = [], 0.0
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        row = {"bin": f"[{b / n_bins:.1f}, {(b + 1) / n_bins:.1f}{']' if b == n_bins - 1 else ')'}", "count": count,
               "mean_predicted": float(probs[mask].mean()) if count else None,
               "observed": float(wins[mask].mean()) if count else None}
        if count:
            ece += count / len(probs) * abs(row["observed"] - row["mean_predicted"])
        table.append(row)
    return ece, table


def pair_report(questions: list[str], chosen: list[str], rejected: list[str], r_j: torch.Tensor,
                r_k: torch.Tensor, *, kinds: list[str] | None = None) -> dict:
    """The whole report as a JSON-ready dict (``chosen``/``rejected`` are the answers, without the question).

    ``kinds``: each pair's kind (the sample data's ``pair_kind`` column), for the accuracy per kind, and over the
    look-alike pairs (kinds ``lookalike_*``: both answers alike in form, the rejected one wrong in substance)."""
    margin = r_j - r_k
    correct = margin > 0  # a tie is wrong: the model expressed no preference
    p = torch.sigmoid(margin)
    ece, table = calibration(p)

    buckets = []
    for lo, hi in zip(MARGIN_EDGES[:-1], MARGIN_EDGES[1:]):
        mask = (margin.abs() >= lo) & (margin.abs() < hi)
        n = int(mask.sum())
        buckets.append({"abs_margin": f"[{lo:g}, {hi:g})", "count": n,
                        "accuracy": float(correct[mask].float().mean()) if n else None})

    len_j = torch.tensor([len(a) for a in chosen], dtype=torch.float64)
    len_k = torch.tensor([len(a) for a in rejected], dtype=torch.float64)
    rejected_longer = len_k > len_j
    worst = sorted((i for i in range(len(margin)) if not correct[i]), key=lambda i: float(margin[i]))[:N_WORST]
    cut = lambda s: s if len(s) <= SHOWN_CHARS else s[:SHOWN_CHARS] + "..."  # noqa: E731
    return {
        "n_pairs": len(margin),
        "accuracy": float(correct.float().mean()),
        "ties": int((margin == 0).sum()),
        "mean_margin": float(margin.mean()),
        "chosen_scores": _stats(r_j),
        "rejected_scores": _stats(r_k),
        "accuracy_by_abs_margin": buckets,
        "ece": ece,
        "calibration_bins": table,
        "length_unit": "characters of the answer (the question excluded)",
        "length_correlation": {
            "chosen": _pearson(r_j, len_j), "rejected": _pearson(r_k, len_k),
            "all": _pearson(torch.cat([r_j, r_k]), torch.cat([len_j, len_k])),
        },
        "accuracy_when_rejected_is_longer": {
            "count": int(rejected_longer.sum()),
            "accuracy": float(correct[rejected_longer].float().mean()) if rejected_longer.any() else None,
        },
        **({} if kinds is None else _by_kind(kinds, correct)),
        "most_confidently_wrong": [
            {"question": cut(questions[i]), "chosen": cut(chosen[i]), "rejected": cut(rejected[i]),
             "chosen_score": float(r_j[i]), "rejected_score": float(r_k[i]), "p_chosen": float(p[i])}
            for i in worst
        ],
    }


def _by_kind(kinds: list[str], correct: torch.Tensor) -> dict:
    by_kind = {}
    for kind in sorted(set(kinds)):
        mask = torch.tensor([k == kind for k in kinds])
        by_kind[kind] = {"count": int(mask.sum()), "accuracy": float(correct[mask].float().mean())}
    lookalike = torch.tensor([k.startswith("lookalike") for k in kinds])
    return {"accuracy_by_kind": by_kind,
            "accuracy_lookalike": float(correct[lookalike].float().mean()) if lookalike.any() else None,
            "n_lookalike": int(lookalike.sum())}


def report_markdown(report: dict, title: str = "Reward model evaluation") -> str:
    """A short human-readable `eval_report.md` of ``pair_report``'s dict (a ``what`` key, if set, says what the
    scores are)."""
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lc, longer = report["length_correlation"], report["accuracy_when_rejected_is_longer"]
    lines = [
        f"# {title}", "", *([report["what"], ""] if report.get("what") else []),
        f"- Pairs: {report['n_pairs']}; accuracy (ties count as wrong): **{f(report['accuracy'])}** "
        f"({report['ties']} ties)",
        f"- Mean margin r_j - r_k: {f(report['mean_margin'])}; chosen scores {f(report['chosen_scores']['mean'])} "
        f"± {f(report['chosen_scores']['std'])}, rejected {f(report['rejected_scores']['mean'])} "
        f"± {f(report['rejected_scores']['std'])}",
        f"- Expected calibration error of sigmoid(r_j - r_k), 10 bins: **{f(report['ece'])}**",
        f"- Pearson correlation of score with answer length in {report['length_unit']}: chosen {f(lc['chosen'])}, "
        f"rejected {f(lc['rejected'])}, all {f(lc['all'])}",
        f"- Accuracy on the {longer['count']} pairs whose rejected answer is longer: {f(longer['accuracy'])}"
        + (" (well below the overall accuracy: the model may be rewarding length)"
           if longer["accuracy"] is not None and longer["accuracy"] < report["accuracy"] - 0.1 else ""),
        *([f"- Accuracy on the {report['n_lookalike']} look-alike pairs (both answers alike in form, the rejected "
           f"one wrong in substance): **{f(report['accuracy_lookalike'])}**", "", "## Accuracy by kind of pair", "",
           "| kind | pairs | accuracy |", "| --- | --- | --- |",
           *(f"| {k} | {v['count']} | {f(v['accuracy'])} |" for k, v in report["accuracy_by_kind"].items())]
          if "accuracy_by_kind" in report else []),
        "", "## Accuracy by |r_j - r_k|", "", "| abs margin | pairs | accuracy |", "| --- | --- | --- |",
        *(f"| {b['abs_margin']} | {b['count']} | {f(b['accuracy'])} |" for b in report["accuracy_by_abs_margin"]),
        "", "## Calibration", "",
        "Each pair counts twice, as (p, preferred wins) and (1 - p, rejected wins), so the table is symmetric.", "",
        "| p bin | count | mean predicted | observed |", "| --- | --- | --- | --- |",
        *(f"| {b['bin']} | {b['count']} | {f(b['mean_predicted'])} | {f(b['observed'])} |"
          for b in report["calibration_bins"]),
        "", f"## The {len(report['most_confidently_wrong'])} most confidently wrong pairs", "",
    ]
    for w in report["most_confidently_wrong"]:
        lines += [f"- p(chosen) {w['p_chosen']:.3f}: chosen {w['chosen_score']:.3f}, "
                  f"rejected {w['rejected_score']:.3f}",
                  f"  - question: {json.dumps(w['question'])}", f"  - chosen: {json.dumps(w['chosen'])}",
                  f"  - rejected: {json.dumps(w['rejected'])}"]
    return "\n".join(lines) + "\n"


def write_report(output_dir: str, report: dict, reward_stats: dict | None = None,
                 title: str = "Reward model evaluation") -> None:
    """`eval_report.json`, `eval_report.md` and, if given, `reward_stats.json` in ``output_dir``."""
    with open(os.path.join(output_dir, "eval_report.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(output_dir, "eval_report.md"), "w", encoding="utf-8") as fh:
        fh.write(report_markdown(report, title))
    if reward_stats is not None:
        with open(os.path.join(output_dir, "reward_stats.json"), "w", encoding="utf-8") as fh:
            json.dump(reward_stats, fh, indent=2)
