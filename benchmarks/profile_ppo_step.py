"""Where one step of our PPO spends its time, on the setup of benchmarks/ppo_vs_trl.py (batch 16, 32 tokens, 4 epochs
of 4 minibatches of 4, tiny hidden-256 Llama with LoRA, float32, CPU).

    python benchmarks/profile_ppo_step.py --model DIR/tiny --reward_model DIR/rm            # torch.profiler, 2 steps
    python benchmarks/profile_ppo_step.py --model DIR/tiny --reward_model DIR/rm --cprofile # Python functions
    # DIR/tiny, DIR/rm: from benchmarks/trl_ppo_baseline.py build_models (EOS suppressed in DIR/tiny)

The trainer is built by `training_rl.build_trainer` from `training_rl.py`'s own parser, as a run builds it; phases
are marked with `record_function` around PPOTrainer's methods (generate, score, reference_and_values, update and,
inside it, the forward, backward, clipping and optimizer step). After `--warmup` steps, `--steps` steps are profiled.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import time

from _setup import ROOT, patched  # first: the repository on sys.path, offline, passive OpenMP


def build(model: str, reward_model: str, out_dir: str, extra: list[str] | None = None):
    from accelerate.utils import set_seed

    import training_rl
    from common.modeling import load_tokenizer

    a, c, m = training_rl.parse([
        "--model_name", model, "--reward_model_name", reward_model, "--dataset_name", ROOT, "--subset", "data/rl",
        "--batch_size", "16", "--mini_batch_size", "4", "--gradient_accumulation_steps", "1", "--ppo_epochs", "4",
        "--output_min_length", "32", "--output_max_length", "32", "--learning_rate", "1.41e-5", "--steps", "16000",
        "--seed", "0", "--output_dir", out_dir, *(extra or [])])
    training_rl.check_args(a, c, m)
    accelerator = training_rl.make_accelerator(a)
    set_seed(c.seed)
    tok = load_tokenizer(m.tokenizer_name or m.model_name_or_path, a.trust_remote_code, "left")
    prompts, _, _ = training_rl.load_prompts(a, tok)
    trainer = training_rl.build_trainer(a, c, m, accelerator, tok, prompts=prompts)
    trainer.eos_ids = []  # every response is exactly 32 tokens (our sampling ignores generation_config)
    return trainer


@contextlib.contextmanager
def mark_phases():
    """record_function labels around PPOTrainer's methods (and accelerate's backward/clip/step) for the profiler, for
    the block; the originals are back after it."""
    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from common import ppo

    def labelled(fn, label):
        def inner(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return inner

    T = ppo.PPOTrainer
    with patched(
        (T, "generate", labelled(T.generate, "ppo:generate")),
        (T, "score", labelled(T.score, "ppo:score")),
        (T, "reference_and_values", labelled(T.reference_and_values, "ppo:reference_and_values")),
        (T, "update", labelled(T.update, "ppo:update")),
        (T, "forward", labelled(T.forward, lambda *a, **k: "ppo:update_forward" if torch.is_grad_enabled()
                                else "ppo:nograd_forward")),
        (Accelerator, "backward", labelled(Accelerator.backward, "ppo:update_backward")),
        (Accelerator, "clip_grad_norm_", labelled(Accelerator.clip_grad_norm_, "ppo:update_clip")),
        (AcceleratedOptimizer, "step", labelled(AcceleratedOptimizer.step, "ppo:update_optimizer")),
    ):
        yield


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--reward_model", required=True)
    p.add_argument("--out_dir", default=os.path.join(ROOT, "runs", "profile_ppo_step"),
                   help="The PPO run's output folder (default runs/profile_ppo_step)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--cprofile", action="store_true", help="cProfile (Python functions) instead of torch.profiler")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--trace", help="also write a Chrome trace here (torch.profiler)")
    a = p.parse_args(argv)

    trainer = build(a.model, a.reward_model, a.out_dir)
    with mark_phases():
        profile_steps(a, trainer)


def profile_steps(a, trainer) -> None:
    """`--warmup` steps, then `--steps` steps under cProfile or torch.profiler, and their tables."""
    import torch

    for _ in range(a.warmup):
        trainer.step()
    print(f"loadavg {list(os.getloadavg())}, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if a.cprofile:
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for _ in range(a.steps):
            trainer.step()
        prof.disable()
        print(f"{a.steps} steps in {time.perf_counter() - t:.2f} s (under cProfile)")
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(a.rows)
            print(s.getvalue())
        return
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            metrics, _ = trainer.step()
    print(f"{a.steps} steps in {time.perf_counter() - t:.2f} s (under the profiler); last step: "
          + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("time/generate", "time/score", "time/train")))
    avg = prof.key_averages()
    phases = sorted((e for e in avg if e.key.startswith("ppo:")), key=lambda e: -e.cpu_time_total)
    print("phases (CPU time per step, ms; 'nograd_forward' = the old-log-prob/value and reference forwards):")
    for e in phases:
        print(f"  {e.key:28} {e.cpu_time_total / 1e3 / a.steps:9.1f}  calls/step {e.count / a.steps:.0f}")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if a.trace:
        prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
