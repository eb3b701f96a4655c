"""Stage 3's methods side by side on one task and one judge: PPO, RLOO and GRPO for the same number of generated
episodes, DPO for PPO's training time, each from the same SFT model, then evaluate.py on held-out questions.

    bash scripts/run_pipeline.sh                                    # once: the demo's SFT model and reward model
    python benchmarks/compare_methods.py --root runs/pipeline --seeds 0 1 2 3 4 --output_dir runs/compare

For each seed, in turn and one at a time (so their speed and memory are comparable):

- `training_rl.py --algorithm ppo|rloo|grpo` from `ROOT/sft_merged` against the reward model `ROOT/rm_merged` (or
  `ROOT/rm`), with the demo's stage 3 flags (`DEMO_PPO` in scripts/run_pipeline.sh, read from there so the two cannot
  drift; `--steps` is the episode count, the same for the three) and `--seed SEED`;
- `training_dpo.py` from the same SFT model with the demo's DPO recipe (`DEMO_DPO`: its learning rate, warm-up and
  cosine decay) for PPO's training time in this seed (the sum of its steps' generate, score and train times, not its
  evaluations): `--max_steps` = that time x DPO's steps per second, measured once by a calibration run
  (`--dpo_calibration_steps`, default 20, in `dpo_calibration/`), so the schedule ends when the time does, and
  `--max_train_seconds` = that time as a guard; no evaluations or checkpoints inside that time;
- `evaluate.py` with the SFT model as baseline and KL reference and every method's adapter, on the demo's
  held-out questions and answer length (`DEMO_EVAL`, without the best-of-n curve), seeded with SEED.

Each training run is a child process started through this script (`--child`), which records the child's peak
resident memory (VmHWM, this process alone) and wall time in `FOLDER.measure.json` beside its output folder.
Episodes per second: RL, episodes over the steps' summed generate + score + train time; DPO, preference pairs over its
`train_runtime` (the same kind of clock, no generation). Speed and memory are reported relative to PPO of the same
seed. The SFT model and reward model are the same for every seed: a seed varies stage 3's sampling, initialisation
and data order, and the evaluation's samples.

A finished run (its final model and `.measure.json` present) is not run again, so re-running the command after a crash
continues where it stopped. The table: per method, the mean over seeds with a 95% t-interval over the seeds' means
where there are 2 or more, the worst seed, and in how many seeds the paired bootstrap interval of evaluate.py said
"better"/"worse" (win rate) or "rose"/"fell" (RM score). Written to OUTPUT_DIR/compare.{json,md} and printed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import runpy
import shlex
import subprocess
import sys
import time

from _setup import ROOT  # first: the repository on sys.path, offline, passive OpenMP

RL_METHODS = ("ppo", "rloo", "grpo")
METHODS = RL_METHODS + ("dpo",)
MEASURE = ".measure.json"  # beside the run's folder: FOLDER.measure.json


# ------------------------------------------------------------------------------------------ a child run


def child(measure_path: str, argv: list[str]) -> None:
    """Runs ``argv`` (a script and its flags) as ``__main__`` in this process and, whatever way it ends, writes its
    wall time and this process's peak resident memory to ``measure_path``."""
    from run import vmhwm_bytes  # benchmarks/run.py (stdlib only at import)

    start = time.perf_counter()

    def record():
        peak = vmhwm_bytes()
        if peak is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        with open(measure_path, "w", encoding="utf-8") as f:
            json.dump({"peak_rss_bytes": peak, "wall_s": time.perf_counter() - start}, f)

    atexit.register(record)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


# ------------------------------------------------------------------------------------------ the demo's flags


def demo_flags(name: str) -> list[str]:
    """A ``DEMO_*`` flag string of scripts/run_pipeline.sh, split into arguments."""
    with open(os.path.join(ROOT, "scripts", "run_pipeline.sh"), encoding="utf-8") as f:
        found = re.search(rf'^\s*{name}="([^"]*)"', f.read(), re.MULTILINE)
    if not found:
        raise SystemExit(f"error: scripts/run_pipeline.sh has no {name}=\"...\": the demo's flags are read from there")
    return shlex.split(found.group(1))


def without(flags: list[str], names: set[str]) -> list[str]:
    """``flags`` less the named flags and their values (one value each, or none before the next ``--flag``)."""
    out, skip = [], False
    for f in flags:
        if f.startswith("--"):
            skip = f[2:] in names
            if not skip:
                out.append(f)
        elif not skip:
            out.append(f)
    return out


def reward_model(root: str) -> str:
    for name in ("rm_merged", "rm"):
        if os.path.isfile(os.path.join(root, name, "config.json")):
            return os.path.join(root, name)
    raise SystemExit(f"error: --root {root}: no reward model (rm_merged/ or rm/ with a config.json); run "
                     f"`OUT={root} bash scripts/run_pipeline.sh` first")


def finished(folder: str) -> bool:
    final = any(os.path.isfile(os.path.join(folder, f)) for f in ("adapter_config.json", "config.json", "eval.json"))
    return final and os.path.isfile(folder + MEASURE)


def run_child(folder: str, argv: list[str], python: str) -> dict:
    """One training or evaluation run as a child process; its log in ``folder``.log; its measure."""
    if finished(folder):
        print(f"  {folder}: done already", flush=True)
    else:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        log = folder + ".log"
        print(f"  {folder}: {' '.join(argv)}", flush=True)
        measure = folder + MEASURE
        with open(log, "w", encoding="utf-8") as out:
            code = subprocess.call([python, os.path.abspath(__file__), "--child", measure, "--", *argv],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0 or not finished(folder):
            with open(log, encoding="utf-8", errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
            raise SystemExit(f"error: {argv[0]} for {folder} failed (exit {code}); its log {log} ends:\n{tail}")
    with open(folder + MEASURE, encoding="utf-8") as f:
        return json.load(f)


def metrics_lines(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rl_throughput(folder: str) -> dict:
    """Episodes and training seconds of an RL run: its steps' generate + score + train times."""
    steps = [m for m in metrics_lines(folder) if "time/train" in m]
    seconds = sum(m["time/generate"] + m["time/score"] + m["time/train"] for m in steps)
    episodes = sum(m["throughput/episodes_per_s"] * (m["time/generate"] + m["time/score"] + m["time/train"])
                   for m in steps)
    return {"steps": len(steps), "episodes": round(episodes), "train_s": seconds, "episodes_per_s": episodes / seconds}


def dpo_throughput(folder: str) -> dict:
    """Pairs and training seconds of a DPO run (the Trainer's end-of-training figures)."""
    end = [m for m in metrics_lines(folder) if "train_runtime" in m][-1]
    pairs = end["train_samples_per_second"] * end["train_runtime"]
    return {"steps": end["step"], "episodes": round(pairs), "train_s": end["train_runtime"],
            "episodes_per_s": pairs / end["train_runtime"]}


def dpo_argv(a, sft: str, folder: str, seed: int, steps: int) -> list[str]:
    """training_dpo.py with the demo's DPO flags for ``steps`` steps, nothing evaluated or saved on the way."""
    flags = without(demo_flags("DEMO_DPO"), {"max_steps", "eval_steps", "save_steps", "eval_first_step"})
    return ["training_dpo.py", "--model_name_or_path", sft, "--dataset_name", ".", "--output_dir", folder,
            "--seed", str(seed), *flags, "--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no"]


def dpo_steps_per_s(a, sft: str, steps: int = 20) -> float:
    """DPO's optimizer steps per second of ``train_runtime`` on this machine: one short run (the first seed's
    flags, ``steps`` steps), made once and reused by every seed and every re-run."""
    folder = os.path.join(a.output_dir, "dpo_calibration")
    run_child(folder, dpo_argv(a, sft, folder, a.seeds[0], steps) + list(a.dpo_args), a.python)
    measured = dpo_throughput(folder)
    return measured["steps"] / measured["train_s"]


# ------------------------------------------------------------------------------------------ one seed


def run_seed(a, seed: int) -> dict:
    work = os.path.join(a.output_dir, f"seed{seed}")
    sft, rm = os.path.join(a.root, "sft_merged"), reward_model(a.root)
    print(f"seed {seed}:", flush=True)
    runs = {}
    for method in [m for m in a.methods if m in RL_METHODS]:
        folder = os.path.join(work, method)
        argv = ["training_rl.py", "--algorithm", method, "--model_name", sft, "--reward_model_name", rm,
                "--dataset_name", ".", "--subset", "data/rl", "--output_dir", folder, "--seed", str(seed),
                *demo_flags("DEMO_PPO"), *a.rl_args]
        runs[method] = {**run_child(folder, argv, a.python), **rl_throughput(folder)}
    if "dpo" in a.methods:
        budget = round(runs["ppo"]["train_s"] if "ppo" in runs else a.dpo_seconds, 3)  # as the flag gives it
        folder = os.path.join(work, "dpo")
        steps = max(1, int(budget * dpo_steps_per_s(a, sft, a.dpo_calibration_steps)))
        argv = dpo_argv(a, sft, folder, seed, steps) + ["--max_train_seconds", f"{budget:.3f}", *a.dpo_args]
        runs["dpo"] = {**run_child(folder, argv, a.python), **dpo_throughput(folder), "budget_s": budget,
                       "planned_steps": steps}
    folder = os.path.join(work, "eval")
    eval_flags = without(demo_flags("DEMO_EVAL"), {"best_of_n", "best_of_n_prompts"})
    argv = ["evaluate.py", "--models", f"sft={sft}", *[f"{m}={os.path.join(work, m)}" for m in runs],
            "--reward_model_name", rm, "--dataset_name", ".", "--subset", "data/evaluation", "--seed", str(seed),
            "--output_dir", folder, *eval_flags, "--best_of_n", "0", *a.eval_args]
    run_child(folder, argv, a.python)
    with open(os.path.join(folder, "eval.json"), encoding="utf-8") as f:
        models = json.load(f)["models"]
    for method, r in runs.items():
        m = models[method]
        r.update({"win_rate_gold": m["vs_baseline"]["win_rate_gold"], "reward_difference":
                  m["vs_baseline"]["reward_difference"], "reward": m["reward"]["mean"], "gold": m["gold"]["mean"],
                  "kl": m["kl"]["mean"] if m["kl"] else None, "length": m["length"]["mean"]})
    runs["sft"] = {"reward": models["sft"]["reward"]["mean"], "gold": models["sft"]["gold"]["mean"],
                   "length": models["sft"]["length"]["mean"]}
    return runs


# ------------------------------------------------------------------------------------------ the table


def over_seeds(values: list[float], higher_is_worse: bool = False) -> dict:
    """Mean, a 95% t-interval over the seeds (2 or more) and the worst seed."""
    from common import stats

    n = len(values)
    mean = sum(values) / n
    out = {"mean": mean, "worst": max(values) if higher_is_worse else min(values), "n": n, "low": None, "high": None}
    if n >= 2:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = stats.t_quantile(0.975, n - 1) * sd / math.sqrt(n)
        out.update(low=mean - half, high=mean + half)
    return out


BETTER_WORSE = {"rose": "better", "fell": "worse"}  # a win rate's interval above or below 0.5


def summarise(per_seed: dict[int, dict], methods: list[str]) -> dict:
    from common import stats

    table = {}
    for method in methods:
        rows = [per_seed[s][method] for s in per_seed]
        wins = [r["win_rate_gold"] for r in rows]
        diffs = [r["reward_difference"] for r in rows]
        entry = {
            "win_rate_gold": over_seeds([w["mean"] for w in wins]),
            "win_verdicts": [BETTER_WORSE.get(v, v) for v in (stats.verdict(w, 0.5) for w in wins)],
            "reward_difference": over_seeds([d["mean"] for d in diffs]),
            "reward_verdicts": [stats.verdict(d) for d in diffs],
            "kl": over_seeds([r["kl"] for r in rows], higher_is_worse=True) if all(r["kl"] is not None for r in rows)
            else None,
            "length": over_seeds([r["length"] for r in rows]),
            "episodes": over_seeds([r["episodes"] for r in rows]),
            "episodes_per_s": over_seeds([r["episodes_per_s"] for r in rows]),
            "peak_rss_gib": over_seeds([r["peak_rss_bytes"] / 2**30 for r in rows], higher_is_worse=True),
        }
        if "ppo" in methods:
            entry["speed_vs_ppo"] = over_seeds([r["episodes_per_s"] / per_seed[s]["ppo"]["episodes_per_s"]
                                                for s, r in zip(per_seed, rows)])
            entry["memory_vs_ppo"] = over_seeds([r["peak_rss_bytes"] / per_seed[s]["ppo"]["peak_rss_bytes"]
                                                 for s, r in zip(per_seed, rows)], higher_is_worse=True)
        table[method] = entry
    return table


def _fmt(d: dict | None, digits: int = 3, signed: bool = False) -> str:
    if d is None:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = f.format(d["mean"])
    if d["low"] is not None:
        text += f" [{f.format(d['low'])}, {f.format(d['high'])}]"
    return text + (f", worst {f.format(d['worst'])}" if d["n"] > 1 else "")


def _count(verdicts: list[str], good: str, bad: str) -> str:
    return f"{verdicts.count(good)} {good}, {verdicts.count(bad)} {bad} of {len(verdicts)}"


def markdown(result: dict) -> str:
    seeds, table = result["seeds"], result["table"]
    lines = [f"Stage 3 methods from the same SFT model ({result['root']}), seeds {', '.join(map(str, seeds))}: mean "
             "over seeds [95% t-interval over seeds], worst seed; verdicts of each seed's paired bootstrap interval "
             f"on {result['eval_prompts']} held-out questions.", "",
             "| method | gold win rate vs SFT | seeds | RM score - SFT | seeds | KL to SFT (nats) | length (tokens) | "
             "episodes (DPO: pairs) | episodes/s vs PPO | peak memory vs PPO |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, e in table.items():
        lines.append(
            f"| {method.upper()} | {_fmt(e['win_rate_gold'])} | {_count(e['win_verdicts'], 'better', 'worse')} | "
            f"{_fmt(e['reward_difference'], signed=True)} | {_count(e['reward_verdicts'], 'rose', 'fell')} | "
            f"{_fmt(e['kl'], 2)} | {e['length']['mean']:.1f} | {e['episodes']['mean']:.0f} | "
            f"{_fmt(e.get('speed_vs_ppo'), 2)} | {_fmt(e.get('memory_vs_ppo'), 2)} |")
    if "ppo" in table:
        p = table["ppo"]
        lines += ["", f"PPO itself: {p['episodes_per_s']['mean']:.2f} episodes/s, peak resident memory "
                      f"{p['peak_rss_gib']['mean']:.2f} GiB (means over seeds)."]
    lines += ["", "Per seed (gold win rate vs SFT; RM score - SFT; KL; episodes/s; peak GiB):", ""]
    for s, runs in result["per_seed"].items():
        cells = [f"{m.upper()} {r['win_rate_gold']['mean']:.3f}; {r['reward_difference']['mean']:+.3f}; "
                 f"{r['kl'] if r['kl'] is None else format(r['kl'], '.2f')}; {r['episodes_per_s']:.2f}; "
                 f"{r['peak_rss_bytes'] / 2**30:.2f}" for m, r in runs.items() if m != "sft"]
        lines.append(f"- seed {s}: " + " | ".join(cells))
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", default="runs/pipeline", help="a pipeline run's folder: its sft_merged/ and rm_merged/ "
                                                           "or rm/ are used (default runs/pipeline)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--output_dir", default="runs/compare")
    p.add_argument("--dpo_seconds", type=float, default=None,
                   help="DPO's training time when PPO is not among --methods (else PPO's of the same seed)")
    p.add_argument("--dpo_calibration_steps", type=int, default=20,
                   help="steps of the run that measures DPO's speed (once, in OUTPUT_DIR/dpo_calibration)")
    p.add_argument("--rl_args", type=shlex.split, default=[], help="flags appended to every training_rl.py run")
    p.add_argument("--dpo_args", type=shlex.split, default=[], help="flags appended to the training_dpo.py run")
    p.add_argument("--eval_args", type=shlex.split, default=[], help="flags appended to the evaluate.py run")
    p.add_argument("--python", default=sys.executable)
    a = p.parse_args(argv)
    a.methods = [m for m in METHODS if m in a.methods]  # PPO first: DPO's budget and the ratios come from it
    if "dpo" in a.methods and "ppo" not in a.methods and not a.dpo_seconds:
        p.error("--methods without ppo: give DPO's training time with --dpo_seconds")
    for need in ("sft_merged/config.json",):
        if not os.path.isfile(os.path.join(a.root, need)):
            p.error(f"--root {a.root} has no {need}: run `OUT={a.root} bash scripts/run_pipeline.sh` first")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    per_seed = {seed: run_seed(a, seed) for seed in a.seeds}
    with open(os.path.join(a.output_dir, f"seed{a.seeds[0]}", "eval", "eval.json"), encoding="utf-8") as f:
        eval_prompts = json.load(f)["prompts"]["n"]
    result = {"root": a.root, "seeds": a.seeds, "methods": a.methods, "eval_prompts": eval_prompts,
              "table": summarise(per_seed, a.methods), "per_seed": {str(s): r for s, r in per_seed.items()}}
    with open(os.path.join(a.output_dir, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(a.output_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:])
    else:
        main()
