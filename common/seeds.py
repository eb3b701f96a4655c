"""The default command's figures against their targets, over several seeds: one column per run, then mean and worst.

    for s in 0 1 2 3 4; do SEED=$s OUT=runs/seed$s bash scripts/run_pipeline.sh; done
    python -m common.seeds runs/seed0 runs/seed1 runs/seed2 runs/seed3 runs/seed4

Reads each run's ``summary.json`` (common/report.py) and prints a Markdown table. "Worst" is the seed furthest on
the wrong side of the target: the largest time or KL, the smallest share, accuracy, win rate or rise. A figure is
"met" only when the worst seed meets it, so one lucky seed cannot carry a row. A run missing a figure shows n/a
there and counts as not meeting it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Target:
    label: str
    value: Callable[[dict], float | None]
    bound: float
    at_most: bool  # True: the figure must stay at or below bound; False: at or above
    digits: int = 3

    @property
    def text(self) -> str:
        return f"{'at most' if self.at_most else 'at least'} {self.bound:g}"

    def worst(self, values: list[float]) -> float:
        return max(values) if self.at_most else min(values)

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound


def _minutes(s: dict) -> float | None:
    seconds = s.get("seconds_per_stage") or {}
    return sum(seconds.values()) / 60 if seconds else None


def _by_kind(s: dict, kind: str) -> float | None:
    return (s.get("rm_accuracy_by_kind") or {}).get(kind)


# The figures scripts/run_pipeline.sh is held to (README.md, "Against the targets").
TARGETS = [
    Target("whole pipeline, minutes (2-core CPU)", _minutes, 12, True, 1),
    Target("SFT answers: share of corpus words", lambda s: s.get("sft_vocabulary_share"), 0.9, False),
    Target("SFT answers ended with EOS", lambda s: s.get("sft_eos_share"), 0.9, False, 2),
    Target("reward model accuracy, look-alike pairs", lambda s: s.get("rm_accuracy_lookalike"), 0.85, False),
    Target("reward model accuracy, wrong-fix pairs", lambda s: _by_kind(s, "lookalike_wrong_fix"), 0.85, False),
    Target("reward model accuracy, broken pairs", lambda s: _by_kind(s, "lookalike_broken"), 0.85, False),
    Target("gold win rate, final vs SFT", lambda s: s.get("gold_win_rate_vs_sft"), 0.65, False),
    # Not a target of its own: whether the one above can be met by a policy that copies no more of the question's
    # names than the SFT model (common.gold.ceiling).
    Target("gold win-rate ceiling without copying names", lambda s: s.get("gold_win_rate_ceiling"), 0.65, False),
    Target("RM score rise, in SFT std", lambda s: s.get("rm_score_rise_in_sft_std"), 1.0, False, 2),
    Target("KL to the SFT model, nats", lambda s: s.get("ppo_kl_to_sft"), 10, True, 2),
]


def load(run_dirs: list[str]) -> list[dict]:
    """The ``summary.json`` of each run folder; a clear error naming the folder when one is missing."""
    summaries = []
    for d in run_dirs:
        path = os.path.join(d, "summary.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found: run scripts/run_pipeline.sh with OUT={d} first")
        with open(path, encoding="utf-8") as f:
            summaries.append(json.load(f))
    return summaries


def table(summaries: list[dict]) -> str:
    """A Markdown table: one row per target, one column per run, then mean, worst and whether the worst meets it."""
    names = [f"seed {s.get('seed', '?')}" for s in summaries]
    lines = ["| figure | target | " + " | ".join(names) + " | mean | worst | met |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- |"]
    for t in TARGETS:
        values = [t.value(s) for s in summaries]
        known = [v for v in values if v is not None]
        cells = [f"{v:.{t.digits}f}" if v is not None else "n/a" for v in values]
        if known:
            mean, worst = sum(known) / len(known), t.worst(known)
            met = "yes" if len(known) == len(values) and t.met(worst) else "**no**"
            tail = [f"{mean:.{t.digits}f}", f"{worst:.{t.digits}f}", met]
        else:
            tail = ["n/a", "n/a", "**no**"]
        lines.append(f"| {t.label} | {t.text} | " + " | ".join(cells + tail) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="pipeline output folders (each with summary.json)")
    args = parser.parse_args(argv)
    text = table(load(args.runs))
    print(text, file=sys.stdout)
    return text


if __name__ == "__main__":
    main()
