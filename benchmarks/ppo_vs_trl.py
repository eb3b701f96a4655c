"""Our PPO (`training_rl.py`) against TRL 1.12's PPOTrainer, episodes/s on one small setup, A/B in turn.

    # once: the TRL 1.12 venv (see benchmarks/trl_ppo_baseline.py)
    python -m venv venv_trl112 --system-site-packages && venv_trl112/bin/pip install trl==1.12.0
    # from the repository root: 3 rounds, each loading both sides once and then running 1 warm-up + 5 timed PPO
    # steps of each, one step of ours and one of TRL's in turn
    python benchmarks/ppo_vs_trl.py --rounds 3 --output ppo_vs_trl.json
    # one side alone (prints one JSON line)
    python benchmarks/ppo_vs_trl.py --side ours --model DIR/tiny --reward_model DIR/rm

Setup (both sides; details in benchmarks/trl_ppo_baseline.py): the 4-layer hidden-256 tiny Llama of
`common.tiny_model` with LoRA r 16 / alpha 32 on all linear layers, float32, CPU, no gradient checkpointing; a reward
model on the same weights; 16 prompts per step from data/rl/train.jsonl, in the same order on both sides; exactly
32 response tokens (EOS suppressed through the model folder's generation_config.json); 4 PPO epochs of 4 minibatches
of 4, one optimizer step each; lr 1.41e-5. Ours runs as

    python training_rl.py --model_name TINY --reward_model_name RM --dataset_name . --subset data/rl \\
        --batch_size 16 --mini_batch_size 4 --gradient_accumulation_steps 1 --ppo_epochs 4 \\
        --output_min_length 32 --output_max_length 32 --learning_rate 1.41e-5 --steps 16*(warmup+steps) ...

in-process (`--side ours`), with timers wrapped around `PPOTrainer` methods (nothing it computes changes). Each side
runs in its own process (ours: this Python; TRL: `--trl_python`). With `--alternate steps` (default) both are loaded,
then the driver lets them take one PPO step each in turn (the other waits, idle, on its stdin; the wait is not timed),
the first side swapping every step and every round, so load from other jobs falls on both alike; `ratio_paired_median`
is the median over step pairs of (TRL step time / our step time), `ratio_best_steps` the ratio of each side's
fastest step; `cpu_ratio_paired_median` the same with process CPU seconds (all threads), which other jobs disturb
less than wall time. `--alternate runs` runs whole processes in turn instead.

A step is timed from the end of the previous one (ours: `PPOTrainer.step` returns, metrics and samples written;
TRL: `on_step_end`), warm-up steps excluded. Phases (seconds per step):
- generate: sampling 32 tokens for 16 prompts (TRL also stacks the scores it takes old log-probs from);
- score: reward model (ours: decode, re-tokenize, append EOS, forward; TRL: forward on the policy's ids);
- value: ours, the no-grad policy forward giving old log-probs and values (shared trunk); TRL, the no-grad forward
  of its separate value model (its old log-probs come from the generation scores);
- ref: the no-grad forward with the adapter disabled;
- update: `ppo_epochs` x minibatches, split into update_forward (the model call, ours with log-softmax),
  update_backward, update_optimizer (AdamW) and, ours only, update_clip (gradient clipping; TRL 1.12 does not clip);
- other: the rest of the step (collate, entropy, GAE, whitening, metrics; TRL: its gc.collect() calls, log-softmax of
  the generation scores, logging).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _setup import ROOT, patched  # first: the repository on sys.path, offline, passive OpenMP
from trl_ppo_baseline import PhaseTimer, build_models, gate, loadavg

TABLE_PHASES = ["generate", "score", "value", "ref", "update", "update_forward", "update_backward", "update_optimizer",
                "update_clip", "other"]


def ours_argv(a, out_dir: str) -> list[str]:
    """`training_rl.py`'s flags for the setup (module docstring)."""
    return ["--model_name", a.model, "--reward_model_name", a.reward_model, "--dataset_name", ROOT,
            "--subset", "data/rl", "--batch_size", str(a.batch_size), "--mini_batch_size", str(a.mini_batch_size),
            "--gradient_accumulation_steps", "1",
            "--ppo_epochs", str(a.ppo_epochs), "--output_min_length", str(a.response_length),
            "--output_max_length", str(a.response_length), "--learning_rate", str(a.learning_rate),
            "--steps", str((a.warmup + a.steps) * a.batch_size), "--seed", str(a.seed), "--output_dir", out_dir,
            "--overwrite_output_dir", "true", "--disable_tqdm", "true"]


class StepClock:
    """Wall and CPU seconds of each of our PPO steps, with the phase split the timer collected during it.

    training_rl.main's loop writes metrics and samples after each step(), then comes back for the next one: a step
    ends at the next call to `step` (or at the final save), so its time includes that bookkeeping."""

    def __init__(self, timer: PhaseTimer, gated: bool):
        self.timer, self.gated = timer, gated
        self.steps: list[dict] = []
        self.last: float | None = None
        self.last_cpu = 0.0

    def close_step(self) -> None:
        now = time.perf_counter()
        ph = self.timer.take()
        ph.pop("ref_and_values", None)  # its forwards are `value` and `ref`; the rest of it (entropy) is `other`
        total = now - self.last
        ph["other"] = total - sum(ph.get(k, 0.0) for k in ("generate", "score", "ref", "value", "update"))
        self.steps.append({"total": total, "cpu_s": time.process_time() - self.last_cpu,
                           **{k: ph.get(k, 0.0) for k in TABLE_PHASES}})
        self.last = now

    def step_starts(self, steps_done: int) -> None:
        """Before `PPOTrainer.step`: closes the previous step (after `steps_done` steps), waits for the driver's go
        under `--gate` (not timed), starts the clock."""
        if self.last is not None and len(self.steps) < steps_done:
            self.close_step()
        if self.gated:
            gate()
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def saving(self, steps_done: int) -> None:
        """Before `PPOTrainer.save_model`: the last step ends."""
        if len(self.steps) < steps_done:
            self.close_step()


@contextlib.contextmanager
def timed_trainer(timer: PhaseTimer, clock: StepClock, widths: list[int]):
    """For the block: phase timers around PPOTrainer's methods and accelerate's backward, clipping and optimizer step,
    `clock` at each step's start and at the final save, the padded prompt width of each step appended to `widths`,
    and no EOS in our sampling. Nothing the methods compute changes; the originals are back after the block."""
    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from common import ppo

    T = ppo.PPOTrainer
    lora_layer = {}

    def adapter_off(trainer) -> bool:
        if "layer" not in lora_layer:
            from peft.tuners.lora import LoraLayer
            model = trainer.accelerator.unwrap_model(trainer.model)
            lora_layer["layer"] = next(m for m in model.modules() if isinstance(m, LoraLayer))
        return lora_layer["layer"].disable_adapters

    def phase(name: str):
        return lambda *x, **k: name

    def forward_phase(self, *x, **k) -> str:
        return "update_forward" if torch.is_grad_enabled() else ("ref" if adapter_off(self) else "value")

    inner_collate, inner_step, inner_save, inner_init = T.collate, T.step, T.save_model, T.__init__

    def collate(self, batch, responses):
        out = inner_collate(self, batch, responses)
        widths.append(out["P"])  # TRL's JSON has the same list when the prompts agree
        return out

    def step(self):
        clock.step_starts(self.progress.step)
        return inner_step(self)

    def save_model(self, folder):
        clock.saving(self.progress.step)
        return inner_save(self, folder)

    # Our sampling ignores the model's generation_config (common/generation.py), so the suppressed EOS that keeps
    # TRL's responses at full length is not seen here: sample with no EOS id instead, the same 32 tokens.
    def init(self, *args, **kwargs):
        inner_init(self, *args, **kwargs)
        self.eos_ids = []

    with patched(
        (T, "generate", timer.wrap(T.generate, phase("generate"))),
        (T, "score", timer.wrap(T.score, phase("score"))),
        (T, "update", timer.wrap(T.update, phase("update"))),
        (T, "reference_and_values", timer.wrap(T.reference_and_values, phase("ref_and_values"))),
        (T, "forward", timer.wrap(T.forward, forward_phase)),
        (Accelerator, "backward", timer.wrap(Accelerator.backward, phase("update_backward"))),
        (Accelerator, "clip_grad_norm_", timer.wrap(Accelerator.clip_grad_norm_, phase("update_clip"))),
        (AcceleratedOptimizer, "step", timer.wrap(AcceleratedOptimizer.step, phase("update_optimizer"))),
        (T, "collate", collate), (T, "step", step), (T, "save_model", save_model), (T, "__init__", init),
    ):
        yield


def run_ours(a) -> dict:
    """`training_rl.main` on the setup, with phase timers around PPOTrainer's methods; one JSON line."""
    import training_rl

    load_avg_start = loadavg()
    out_dir = os.path.join(a.work_dir, "ours_out")
    timer = PhaseTimer()
    clock = StepClock(timer, a.gate)
    widths: list[int] = []  # padded prompt width per step
    with timed_trainer(timer, clock, widths):
        t0 = time.perf_counter()
        training_rl.main(*training_rl.parse(ours_argv(a, out_dir)))
        wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return ours_report(a, clock.steps, metrics, widths, wall, load_avg_start=load_avg_start)


def ours_report(a, steps: list[dict], metrics: list[dict], widths: list[int], wall: float,
                *, load_avg_start: list[str]) -> dict:
    """Our side's JSON line from its step times and `metrics.jsonl`; exits if a response was not full length."""
    import torch

    lengths = [m["response/length_mean"] for m in metrics]
    if any(length != a.response_length for length in lengths):
        raise SystemExit(f"responses are not all {a.response_length} tokens: response/length_mean {lengths}")
    timed = steps[a.warmup :]
    med = {k: statistics.median(s[k] for s in timed) for k in ["total", *TABLE_PHASES]}
    mt = metrics[a.warmup :]
    return {
        "side": "ours",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "batch_size": a.batch_size, "response_length": a.response_length,
        "warmup_steps": a.warmup, "timed_steps": len(timed),
        "episodes_per_s": a.batch_size / med["total"],
        "step_s_median": med["total"],
        "phases_s_median": {k: med[k] for k in TABLE_PHASES},
        "step_s_all": [round(s["total"], 4) for s in timed],
        "steps": [{k: round(v, 4) for k, v in s.items()} for s in steps],
        # training_rl's own figures (t0..t3 inside step(): metrics, samples and the loop not included)
        "metrics_episodes_per_s_median": statistics.median(m["throughput/episodes_per_s"] for m in mt),
        "metrics_time_s_median": {k: statistics.median(m[f"time/{k}"] for m in mt)
                                  for k in ("generate", "score", "train")},
        "response_length_mean": lengths,
        "prompt_width_per_step": widths,
        "run_wall_s": wall,
        "loadavg_start": load_avg_start, "loadavg_end": loadavg(),
    }


def last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{") and '"side"' in line:
            return json.loads(line)
    raise RuntimeError("no result line in the output:\n" + text[-3000:])


def drive(a) -> dict:
    work = a.work_dir or tempfile.mkdtemp(prefix="ppo_vs_trl_")
    os.makedirs(work, exist_ok=True)
    if a.model is None or a.reward_model is None:
        a.model, a.reward_model = build_models(work, a.seed)
    common = ["--model", a.model, "--reward_model", a.reward_model, "--warmup", str(a.warmup), "--steps", str(a.steps),
              "--batch_size", str(a.batch_size), "--mini_batch_size", str(a.mini_batch_size),
              "--ppo_epochs", str(a.ppo_epochs), "--response_length", str(a.response_length),
              "--learning_rate", str(a.learning_rate), "--seed", str(a.seed)]
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    pairs: list[dict] = []
    for r in range(a.rounds):
        cmds = {
            "ours": [sys.executable, os.path.abspath(__file__), "--side", "ours", "--work_dir",
                     os.path.join(work, f"ours{r}"), *common],
            "trl": [a.trl_python, os.path.join(ROOT, "benchmarks", "trl_ppo_baseline.py"), "--work_dir",
                    os.path.join(work, f"trl{r}"), *common],
        }
        first = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]  # neither side always first
        t = time.perf_counter()
        if a.alternate == "steps":
            got = run_step_alternated(cmds, first, a.warmup + a.steps, work, r)
        else:
            got = {}
            for side in first:
                proc = subprocess.run(cmds[side], cwd=ROOT, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"{side} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                       f"{proc.stderr[-3000:]}")
                got[side] = last_json_line(proc.stdout)
        for side in ("ours", "trl"):
            results[side].append(got[side])
        for i in range(a.warmup, a.warmup + a.steps):
            o, tr = got["ours"]["steps"][i], got["trl"]["steps"][i]
            pairs.append({"round": r, "step": i, "ours_s": o["total"], "trl_s": tr["total"],
                          "ratio": tr["total"] / o["total"],
                          "ours_cpu_s": o["cpu_s"], "trl_cpu_s": tr["cpu_s"], "cpu_ratio": tr["cpu_s"] / o["cpu_s"],
                          "loadavg": got.get("pair_loadavg", [None] * (i + 1))[i]})
        print(f"round {r + 1}/{a.rounds} ({time.perf_counter() - t:.0f} s): ours {got['ours']['episodes_per_s']:.3f}, "
              f"TRL {got['trl']['episodes_per_s']:.3f} episodes/s (medians of {a.steps} steps)", flush=True)
    return summarise(results, pairs, a)


def run_step_alternated(cmds: dict, first: list[str], n_steps: int, work: str, r: int) -> dict:
    """Both sides loaded in their own processes, then one PPO step of each in turn (the other waits on its stdin)."""
    procs, logs = {}, {}

    def stop(proc):  # only on an error: a side left waiting for its next step
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def read_until(side: str, want_gate: bool):
        for line in procs[side].stdout:
            if want_gate and line.startswith("GATE"):
                return None
            if not want_gate and line.startswith("{") and '"side"' in line:
                return json.loads(line)
        raise RuntimeError(f"{side} ended early (exit {procs[side].wait()}); see {logs[side].name}")

    with contextlib.ExitStack() as stack:
        for side, cmd in cmds.items():
            logs[side] = stack.enter_context(open(os.path.join(work, f"{side}{r}.stderr.log"), "w"))
            procs[side] = subprocess.Popen([*cmd, "--gate"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=logs[side], text=True, bufsize=1)
            stack.callback(stop, procs[side])
        for side in first:
            read_until(side, True)  # loaded, waiting before its first step
        got, loads = {}, []
        for i in range(n_steps):
            loads.append(loadavg()[0])
            for side in (first if i % 2 == 0 else first[::-1]):
                procs[side].stdin.write("go\n")
                procs[side].stdin.flush()
                if i < n_steps - 1:
                    read_until(side, True)
                else:
                    got[side] = read_until(side, False)
        for side in first:
            procs[side].stdin.close()
            if procs[side].wait() != 0:
                raise RuntimeError(f"{side} failed; see {logs[side].name}")
    got["pair_loadavg"] = loads
    return got


def summarise(results: dict, pairs: list[dict], a) -> dict:
    med = statistics.median
    summary = {}
    for side, runs in results.items():
        timed = [s for r in runs for s in r["steps"][a.warmup:]]
        summary[side] = {
            "episodes_per_s_median": a.batch_size / med(s["total"] for s in timed),
            "step_s_median": med(s["total"] for s in timed),
            "step_s_min": min(s["total"] for s in timed),
            "step_cpu_s_median": med(s["cpu_s"] for s in timed),
            "episodes_per_s_runs": [r["episodes_per_s"] for r in runs],
            "phases_s_median": {k: med(s.get(k, 0.0) for s in timed) for k in TABLE_PHASES},
            "loadavg": [(r["loadavg_start"][0], r["loadavg_end"][0]) for r in runs],
        }
    widths = {side: {tuple(r["prompt_width_per_step"]) for r in runs} for side, runs in results.items()}
    if widths["ours"] != widths["trl"]:
        print(f"warning: the two sides saw prompts of different widths: {widths}")
    out = {"setup": {k: getattr(a, k) for k in ("batch_size", "mini_batch_size", "ppo_epochs", "response_length",
                                                 "learning_rate", "warmup", "steps", "rounds", "seed", "alternate")},
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "summary": summary,
           "ratio_ours_over_trl": summary["ours"]["episodes_per_s_median"] / summary["trl"]["episodes_per_s_median"],
           "ratio_paired_median": med(p["ratio"] for p in pairs),
           "ratio_paired_range": [min(p["ratio"] for p in pairs), max(p["ratio"] for p in pairs)],
           "ratio_best_steps": summary["trl"]["step_s_min"] / summary["ours"]["step_s_min"],
           "cpu_ratio_paired_median": med(p["cpu_ratio"] for p in pairs),
           "ratio_per_round": [o["episodes_per_s"] / t["episodes_per_s"]
                               for o, t in zip(results["ours"], results["trl"])],
           "pairs": pairs,
           "prompt_width_per_step": {side: sorted(w) for side, w in widths.items()},
           "runs": results}
    print_table(out)
    return out


def print_table(out: dict) -> None:
    s = out["summary"]
    print()
    print(f"{'':18}{'ours':>10}{'TRL 1.12':>10}{'TRL/ours':>10}   (medians over every timed step)")
    print(f"{'episodes/s':18}{s['ours']['episodes_per_s_median']:10.3f}{s['trl']['episodes_per_s_median']:10.3f}")
    print(f"{'step s':18}{s['ours']['step_s_median']:10.3f}{s['trl']['step_s_median']:10.3f}"
          f"{s['trl']['step_s_median'] / s['ours']['step_s_median']:10.2f}")
    for k in TABLE_PHASES:
        o, t = s["ours"]["phases_s_median"][k], s["trl"]["phases_s_median"].get(k, 0.0)
        print(f"{'  ' + k:18}{o:10.3f}{t:10.3f}" + (f"{t / o:10.2f}" if o > 1e-9 and t > 1e-9 else f"{'-':>10}"))
    print(f"ratio ours/TRL episodes/s: {out['ratio_ours_over_trl']:.2f} (medians), paired steps median "
          f"{out['ratio_paired_median']:.2f} (range {out['ratio_paired_range'][0]:.2f}-"
          f"{out['ratio_paired_range'][1]:.2f}, "
          f"{len(out['pairs'])} pairs), best steps {out['ratio_best_steps']:.2f}; per round "
          + ", ".join(f"{r:.2f}" for r in out["ratio_per_round"]))
    print(f"process CPU seconds per step (all threads), medians: ours {s['ours']['step_cpu_s_median']:.3f}, "
          f"TRL {s['trl']['step_cpu_s_median']:.3f}; paired CPU ratio TRL/ours {out['cpu_ratio_paired_median']:.2f}")
    print("load average (1 min) at each timed pair: " + " ".join(str(p["loadavg"]) for p in out["pairs"]))
    print("load average (1 min, start/end of each process): ours "
          + " ".join(f"{x}/{y}" for x, y in s["ours"]["loadavg"])
          + "; TRL " + " ".join(f"{x}/{y}" for x, y in s["trl"]["loadavg"]))


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=["both", "ours"], default="both")
    p.add_argument("--trl_python", default=os.environ.get("TRL112_PYTHON", "venv_trl112/bin/python"),
                   help="Python of the TRL 1.12 venv (default: $TRL112_PYTHON, else venv_trl112/bin/python)")
    p.add_argument("--model")
    p.add_argument("--reward_model")
    p.add_argument("--work_dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--mini_batch_size", type=int, default=4)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--response_length", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1.41e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alternate", choices=["steps", "runs"], default="steps",
                   help="steps: both sides load once per round, then run one PPO step each in turn; "
                        "runs: whole runs in turn")
    p.add_argument("--gate", action="store_true", help=argparse.SUPPRESS)  # --side ours under --alternate steps
    p.add_argument("--output", help="write the full results (every run, every step) here as JSON")
    a = p.parse_args(argv)
    if a.side == "ours":
        if a.model is None or a.reward_model is None:
            a.work_dir = a.work_dir or tempfile.mkdtemp(prefix="ppo_ours_")
            a.model, a.reward_model = build_models(a.work_dir, a.seed)
        a.work_dir = a.work_dir or tempfile.mkdtemp(prefix="ppo_ours_")
        print(json.dumps(run_ours(a)))
        return
    out = drive(a)
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
