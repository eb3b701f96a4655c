"""The pipeline's summary: ``summary.json``, ``report.md`` and plots from the stage folders of one pipeline run.

    python -m common.report runs/pipeline --seconds_per_stage '{"SFT": 40.1, ...}' --seed 0

Expects the layout ``scripts/run_pipeline.sh`` writes under its output root: ``sft/``, ``rm/``, ``ppo/`` (or ``dpo/``
when the pipeline ran with ``ALGO=dpo``) and ``eval/`` (evaluate.py comparing the SFT model with the final model on
held-out questions); missing parts are reported as n/a. The summary has the same keys whichever stage 3 ran: those of
the other algorithm are null.

Every verdict is earned (docs/design.md, "Evaluation and the gold judge"): a change is "rose" or "fell" only if its 95%
interval excludes no change, else "no clear change". Held-out comparisons use paired bootstrap intervals over the
questions (common/stats.py, computed by evaluate.py); the PPO training curve compares its first and last fifth of
steps with a Welch interval. When the reward-model score rises and the gold score falls, both past the noise, the
summary says "reward hacking" and shows the final model's most repeated answers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from common import stats
from common.cli import run
from common.outputs import check_writable, read_metrics

READABLE_SHARE = 0.9  # the share of corpus words above which answers count as readable


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


RL_ALGORITHMS = ("ppo", "rloo", "grpo")  # training_rl.py's, each in a stage folder of its name; their metrics alike
ALGORITHMS = (*RL_ALGORITHMS, "dpo")


def algorithm(root: str) -> str:
    """Which stage 3 the pipeline ran: the one of ``ppo/``, ``rloo/``, ``grpo/`` and ``dpo/`` that holds metrics
    (``ppo`` when none or several do)."""
    ran = [a for a in ALGORITHMS if os.path.isfile(os.path.join(root, a, "metrics.jsonl"))]
    return ran[0] if len(ran) == 1 else "ppo"


def _stage3_seed(root: str, algo: str, default: int | None) -> int | None:
    """The seed stage 3 ran with (its run_args.yaml), so a re-run that skips finished stages reports the seed they
    were trained with, not the re-run's; ``default`` where there is no such file."""
    import yaml

    path = os.path.join(root, algo, "run_args.yaml")
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return (yaml.safe_load(f).get("DPOConfig" if algo == "dpo" else "PPOConfig") or {}).get("seed", default)


def summarize(root: str, seconds_per_stage: dict | None = None, seed: int | None = None) -> dict:
    """The headline numbers of a pipeline run, with their intervals and verdicts."""
    sft = read_metrics(os.path.join(root, "sft"))
    evals = [m["eval_loss"] for m in sft if m.get("eval_loss") is not None]
    rm = _load_json(os.path.join(root, "rm", "eval_report.json"))
    algo = algorithm(root)
    ppo_lines = read_metrics(os.path.join(root, algo)) if algo in RL_ALGORITHMS else []  # ppo_*: the RL stage's
    dpo_lines = read_metrics(os.path.join(root, "dpo")) if algo == "dpo" else []
    dpo_evals = [m for m in dpo_lines if m.get("eval_loss") is not None]
    dpo_report = _load_json(os.path.join(root, "dpo", "eval_report.json")) if algo == "dpo" else {}
    ppo = [m for m in ppo_lines if m.get("objective/scores") is not None]
    held_out = [m for m in ppo_lines if m.get("eval/rm_score") is not None]
    ev = _load_json(os.path.join(root, "eval", "eval.json"))
    names = list(_get(ev, "settings", "models") or {})
    base, final = (names[0], names[-1]) if len(names) >= 2 else (None, None)
    m_base, m_final = _get(ev, "models", base), _get(ev, "models", final)
    vs = _get(m_final, "vs_baseline") or {}
    sft_rewards = [r["answers"][base]["reward"] for r in ev.get("rows", [])] if base else []
    reward_std = _std(sft_rewards)
    rise = _get(vs, "reward_difference", "mean")
    trend = stats.step_trend([m["objective/scores"] for m in ppo]) if ppo else None
    summary = {
        "seed": _stage3_seed(root, algo, seed),
        "algorithm": algo,
        "sft_eval_loss_before": evals[0] if evals else None,
        "sft_eval_loss_after": evals[-1] if evals else None,
        "sft_vocabulary_share": _get(m_base, "readable_share", "mean"),
        "rm_eval_accuracy": rm.get("accuracy"),
        "rm_accuracy_lookalike": rm.get("accuracy_lookalike"),
        "rm_pairs": rm.get("n_pairs"),
        "rm_lookalike_pairs": rm.get("n_lookalike"),
        "rm_ece": rm.get("ece"),
        "rm_accuracy_by_kind": {k: v["accuracy"] for k, v in (rm.get("accuracy_by_kind") or {}).items()},
        "ppo_steps": len(ppo),
        "ppo_score_trend": trend,
        "ppo_score_first": trend["first"] if trend else None,
        "ppo_score_last": trend["last"] if trend else None,
        "ppo_kl_last": ppo[-1]["objective/kl"] if ppo else None,
        "ppo_kl_max": max((m["objective/kl"] for m in ppo), default=None),
        "ppo_kl_coef_last": ppo[-1]["objective/kl_coef"] if ppo else None,
        "ppo_explained_variance_last": ppo[-1].get("val/explained_variance") if ppo else None,
        "ppo_held_out": [{k: m.get(k) for k in ("step", "eval/rm_score", "eval/gold", "eval/length")}
                         for m in held_out],
        "dpo_steps": max((m["step"] for m in dpo_lines if m.get("loss") is not None), default=None),
        "dpo_eval_loss_first": dpo_evals[0]["eval_loss"] if dpo_evals else None,
        "dpo_eval_loss_last": dpo_evals[-1]["eval_loss"] if dpo_evals else None,
        "dpo_eval_accuracy": dpo_report.get("accuracy"),
        "dpo_eval_accuracy_lookalike": dpo_report.get("accuracy_lookalike"),
        "dpo_eval_mean_margin": dpo_report.get("mean_margin"),
        "eval_prompts": _get(ev, "prompts", "n"),
        "eval_baseline": base,
        "eval_final": final,
        "rm_score_sft": _get(m_base, "reward", "mean"),
        "rm_score_final": _get(m_final, "reward", "mean"),
        "rm_score_difference": vs.get("reward_difference"),
        "rm_score_rise_in_sft_std": rise / reward_std if rise is not None and reward_std else None,
        "gold_score_sft": _get(m_base, "gold", "mean"),
        "gold_score_final": _get(m_final, "gold", "mean"),
        "gold_difference": vs.get("gold_difference"),
        "gold_win_rate_vs_sft": _get(vs, "win_rate_gold", "mean"),
        "gold_win_rate_interval": vs.get("win_rate_gold"),
        "gold_win_rate_ceiling": _get(vs, "win_rate_gold_ceiling", "mean"),
        "rm_win_rate_vs_sft": _get(vs, "win_rate_reward", "mean"),
        "ppo_kl_to_sft": _get(m_final, "kl", "mean"),
        "sft_eos_share": _get(m_base, "eos_fraction"),
        "gold_parts": {role: {k: v["mean"] for k, v in (_get(m, "gold_parts") or {}).items()}
                       for role, m in (("sft", m_base), ("final", m_final)) if _get(m, "gold_parts")},
        "length_sft": _get(m_base, "length", "mean"),
        "length_final": _get(m_final, "length", "mean"),
        "best_of_n": {k: ev["best_of_n"].get(k) for k in ("model", "curve", "reward_change", "gold_change")}
        if ev.get("best_of_n") else None,
        "seconds_per_stage": seconds_per_stage or {},
    }
    summary["reward_hacking"] = (_verdict(summary["rm_score_difference"]) == stats.ROSE
                                 and _verdict(summary["gold_difference"]) == stats.FELL)
    summary["most_repeated_final_answers"] = most_repeated(ev, final) if final else []
    return summary


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _verdict(d: dict | None) -> str:
    return d.get("verdict", stats.NO_CLEAR_CHANGE) if isinstance(d, dict) else stats.NO_CLEAR_CHANGE


def most_repeated(ev: dict, name: str, top: int = 3) -> list[dict]:
    """The answers the model gave most often to different questions (a collapse onto one answer shows here)."""
    counts = collections.Counter(r["answers"][name]["answer"].strip()
                                 for r in ev.get("rows", []) if name in r["answers"])
    return [{"answer": a, "times": n} for a, n in counts.most_common(top) if n > 1]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(d: dict | None, digits: int = 3) -> str:
    """A difference and its interval, signed: ``+0.093 [-0.051, +0.244]``."""
    return _interval(d, digits, sign="+")


def summary_lines(s: dict) -> list[str]:
    """The printed summary: each figure with its interval and verdict."""
    t = s["ppo_score_trend"] or {}
    readable = s["sft_vocabulary_share"]
    lines = [
        f"================ RLHF pipeline summary (seed {_fmt(s['seed'])}) ================",
        f"SFT           eval loss {_fmt(s['sft_eval_loss_before'])} -> {_fmt(s['sft_eval_loss_after'])}; answers "
        f"readable: {_fmt(readable)} of their words are corpus words"
        + (f" ({'>=' if readable >= READABLE_SHARE else '<'} {READABLE_SHARE})" if readable is not None else ""),
        f"reward model  accuracy {_fmt(s['rm_eval_accuracy'])} on {_fmt(s['rm_pairs'])} held-out pairs; on the "
        f"{_fmt(s['rm_lookalike_pairs'])} look-alike pairs {_fmt(s['rm_accuracy_lookalike'])}",
    ]
    if s.get("rm_accuracy_by_kind"):
        lines.append("  by kind     " + _kinds_text(s["rm_accuracy_by_kind"]))
    lines.append(_stage3_line(s, t))
    if s["eval_final"]:
        n = s["eval_prompts"]
        lines += [
            f"held out      {n} questions, final model vs SFT model (95% intervals):",
            f"  RM score    {_fmt(s['rm_score_sft'])} -> {_fmt(s['rm_score_final'])}: "
            f"{_ci(s['rm_score_difference'])}, {_verdict(s['rm_score_difference'])} "
            f"({_fmt(s['rm_score_rise_in_sft_std'], 2)} SFT std)",
            f"  gold score  {_fmt(s['gold_score_sft'])} -> {_fmt(s['gold_score_final'])}: "
            f"{_ci(s['gold_difference'])}, {_verdict(s['gold_difference'])}",
            f"  gold wins   final beats SFT in {_interval(s['gold_win_rate_interval'])} of the questions "
            f"(ties 1/2): {_verdict_win(s['gold_win_rate_interval'])}"
            + (f"; ceiling {s['gold_win_rate_ceiling']:.2f} without copying names" if s.get("gold_win_rate_ceiling")
               is not None else ""),
            f"  KL to SFT   {_fmt(s['ppo_kl_to_sft'], 2)} nats; length {_fmt(s['length_sft'], 1)} -> "
            f"{_fmt(s['length_final'], 1)} tokens; SFT answers ended with EOS: {_fmt(s.get('sft_eos_share'), 2)}",
        ]
        parts = s.get("gold_parts") or {}
        if "sft" in parts and "final" in parts:
            lines.append("  gold parts  " + ", ".join(
                f"{k} {parts['sft'][k]:.2f} -> {parts['final'][k]:.2f}" for k in parts["sft"]))
        if s["reward_hacking"]:
            lines.append("verdict       REWARD HACKING: the reward model's score rose and the gold score fell. Most "
                         "repeated final answers:")
            lines += [f"  {a['times']}x {a['answer'][:100]!r}" for a in s["most_repeated_final_answers"]]
        else:
            lines.append("verdict       " + overall(s))
    if s["seconds_per_stage"]:
        lines.append("time          " + ", ".join(f"{k} {v:.0f}s" for k, v in s["seconds_per_stage"].items()))
    lines.append("=" * len(lines[0]))
    return lines


def _kinds_text(kinds: dict) -> str:
    """The look-alike kinds one by one (worst first), the other kinds as a range: ``wrong_fix 0.60, broken 0.75;
    5 other kinds 1.00``."""
    alike = sorted(((k, v) for k, v in kinds.items() if k.startswith("lookalike_")), key=lambda kv: kv[1])
    others = [v for k, v in kinds.items() if not k.startswith("lookalike_")]
    text = ", ".join(f"{k.removeprefix('lookalike_')} {v:.2f}" for k, v in alike)
    if others:
        low, high = min(others), max(others)
        span = f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}"
        text += ("; " if text else "") + f"{len(others)} other kind{'s' * (len(others) > 1)} {span}"
    return text


def _stage3_line(s: dict, t: dict) -> str:
    if s.get("algorithm") == "dpo":
        return (f"DPO training  eval loss {_fmt(s['dpo_eval_loss_first'])} -> {_fmt(s['dpo_eval_loss_last'])} in "
                f"{_fmt(s['dpo_steps'])} steps; implicit reward accuracy {_fmt(s['dpo_eval_accuracy'])} on the "
                f"held-out pairs, {_fmt(s['dpo_eval_accuracy_lookalike'])} on the look-alike ones")
    label = f"{s.get('algorithm', 'ppo').upper()} training".ljust(14)  # the column of the other lines' labels
    return (f"{label}score {_fmt(t.get('first'))} -> {_fmt(t.get('last'))} (first -> last fifth of "
            f"{s['ppo_steps']} steps): {t.get('verdict', stats.NO_CLEAR_CHANGE)}; KL last {_fmt(s['ppo_kl_last'], 2)}, "
            f"max {_fmt(s['ppo_kl_max'], 2)}")


def _interval(d: dict | None, digits: int = 3, sign: str = "") -> str:
    """A mean and its interval: ``0.532 [0.497, 0.568]`` (``sign="+"`` shows the signs of a difference)."""
    if not d or d.get("mean") is None:
        return "n/a"
    f = f"{{:{sign}.{digits}f}}".format
    return f(d["mean"]) if d.get("low") is None else f"{f(d['mean'])} [{f(d['low'])}, {f(d['high'])}]"


def _verdict_win(d: dict | None) -> str:
    v = stats.verdict(d, null=0.5) if d else stats.NO_CLEAR_CHANGE
    return {stats.ROSE: "better than the SFT model", stats.FELL: "worse than the SFT model"}.get(v, v)


def overall(s: dict) -> str:
    gold, rm = _verdict(s["gold_difference"]), _verdict(s["rm_score_difference"])
    if s["gold_difference"] is None:
        return f"RM score {rm} (no gold judge for these questions)"
    if gold == stats.ROSE:
        return "RLHF made the answers better: the gold score rose past the noise"
    if gold == stats.FELL:
        return "RLHF made the answers worse: the gold score fell past the noise"
    return f"no clear change in answer quality (gold); RM score {rm}"


def write_report(root: str, s: dict, plots: list[str], examples: list[dict]) -> str:
    lines = ["# RLHF pipeline report", "", "```", *summary_lines(s), "```", ""]
    if s["ppo_held_out"]:
        lines += [f"## Held-out questions during {s.get('algorithm', 'ppo').upper()} (proxy and gold side by side)",
                  "",
                  "| step | RM score | gold | length |", "| --- | --- | --- | --- |",
                  *(f"| {h['step']} | {_fmt(h['eval/rm_score'])} | {_fmt(h['eval/gold'])} "
                    f"| {_fmt(h['eval/length'], 1)} |"
                    for h in s["ppo_held_out"]), ""]
    parts = s.get("gold_parts") or {}
    if "sft" in parts and "final" in parts:
        lines += ["## What moved in the gold score", "",
                  "Means over the held-out questions: share of the right fix's terms in the code (fix), of the "
                  "question's names in the answer (names; the tiny base cannot copy names from the question, so "
                  "this part stays near chance), of answers with a marker of a broken fix (broken, lower is "
                  "better), with a code block (code), ended with EOS (eos).", "",
                  "| model | " + " | ".join(parts["sft"]) + " |", "| --- |" + " --- |" * len(parts["sft"]),
                  *(f"| {s['eval_baseline' if role == 'sft' else 'eval_final']} | "
                    + " | ".join(f"{v:.3f}" for v in parts[role].values()) + " |" for role in ("sft", "final")), ""]
        if s.get("gold_win_rate_ceiling") is not None:
            lines += [f"Ceiling: answers with the whole fix and nothing wrong, but no more of the question's names "
                      f"than the SFT model's, would beat the SFT model in {s['gold_win_rate_ceiling']:.3f} of these "
                      "questions (ties 1/2; `common.gold.ceiling`): the gold win rate a policy reaches without "
                      "copying names.", ""]
    if s["best_of_n"]:
        b = s["best_of_n"]
        lines += [f"## Best of n ({b['model']}): the reward model's pick among n answers", "",
                  "| n | RM score of the pick | gold of the pick |", "| --- | --- | --- |",
                  *(f"| {c['n']} | {_interval(c['reward'])} | {_interval(c['gold'])} |" for c in b["curve"]), ""]
    if examples:
        lines += [f"## The same held-out questions, before and after {s.get('algorithm', 'ppo').upper()}", "",
                  "One sampled answer each (the same seed for both models); "
                  "RM = reward model, gold = common/gold.py.", ""]
        for i, row in enumerate(examples, 1):
            lines += [f"### {i}. {row['question']}", "",
                      f"| {s['eval_baseline']} | {s['eval_final']} |", "| --- | --- |"]
            a, b = row["answers"][s["eval_baseline"]], row["answers"][s["eval_final"]]
            lines += [f"| {_cell(a['answer'])} | {_cell(b['answer'])} |",
                      f"| RM {a['reward']:.3f}, gold {_fmt(a['gold'], 2)} "
                      f"| RM {b['reward']:.3f}, gold {_fmt(b['gold'], 2)} |", ""]
    lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, root)})" for p in plots]
    path = os.path.join(root, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>").strip() or "(empty)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--seconds_per_stage", default="{}", help="JSON object of stage -> seconds")
    parser.add_argument("--seed", type=int, default=None, help="The seed the pipeline ran with (recorded).")
    parser.add_argument("--num_examples", type=int, default=3)
    args = parser.parse_args(argv)
    from common.plots import plot_pipeline

    check_writable(args.root, "the report's folder")  # summary.json, report.md and the plots go there

    summary = summarize(args.root, json.loads(args.seconds_per_stage), args.seed)
    with open(os.path.join(args.root, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    plots = plot_pipeline(args.root)
    eval_dir = os.path.join(args.root, "eval")
    plots += [os.path.join(eval_dir, p) for p in ("models.png", "best_of_n.png")
              if os.path.isfile(os.path.join(eval_dir, p))]
    ev = _load_json(os.path.join(eval_dir, "eval.json"))
    examples = [r for r in ev.get("rows", []) if r.get("has_answer_key", True)][: args.num_examples]
    write_report(args.root, summary, plots, examples)
    print("\n".join(summary_lines(summary)), file=sys.stdout)
    if examples and summary["eval_final"]:
        row = examples[0]
        a, b = row["answers"][summary["eval_baseline"]], row["answers"][summary["eval_final"]]
        print(f"\nQ: {row['question']}\n"
              f"SFT   (RM {a['reward']:+.2f}, gold {_fmt(a['gold'], 2)}): {a['answer'][:200]!r}\n"
              f"final (RM {b['reward']:+.2f}, gold {_fmt(b['gold'], 2)}): {b['answer'][:200]!r}")
    return summary


if __name__ == "__main__":
    run(main)
