"""Episodes/s of TRL 1.12's PPOTrainer (`trl.experimental.ppo`) on the setup our PPO is compared on.

TRL 1.13+ ships no PPO trainer, so this runs in its own virtual environment with TRL 1.12 over the system
torch 2.13 (CPU wheel), transformers 5.23, accelerate 1.15 and peft 0.21 (nothing else changes):

    python -m venv venv_trl112 --system-site-packages
    venv_trl112/bin/pip install --dry-run trl==1.12.0   # must list only trl (and setuptools), no torch
    venv_trl112/bin/pip install trl==1.12.0

    # from the repository root; builds the tiny model and reward model in a temporary folder
    venv_trl112/bin/python benchmarks/trl_ppo_baseline.py
    # or on given folders (benchmarks/ppo_vs_trl.py builds them once with `--side build` and passes them)
    venv_trl112/bin/python benchmarks/trl_ppo_baseline.py --model DIR/tiny --reward_model DIR/rm --steps 5

It prints one JSON line: episodes/s (median over the timed steps, after `--warmup` steps; loading excluded),
per-step seconds and a per-phase split (see PHASES). `benchmarks/ppo_vs_trl.py` runs this and our PPO in turn.

The setup (ours: `training_rl.py` defaults unless said):
- policy: `python -m common.tiny_model` (4-layer Llama, hidden 256, vocab 2048, 3.95M parameters), float32, CPU,
  no gradient checkpointing, LoRA r 16, alpha 32, dropout 0.05 (then set to 0 by both trainers), all linear
  layers but the LM head (`target_modules="all-linear"`, as our ModelArguments);
- reward model: the same weights as a one-label sequence classifier with a random `score` head saved with a fixed
  seed (tests/test_ppo.py `_save_reward_model`);
- 16 prompts per PPO step, `Question: {question}\n\nAnswer: ` (common/prompts.py) from data/rl/train.jsonl, in
  the order our trainer takes them (`torch.randperm(n, seed 0)`), so step k of both sides sees the same prompts;
- exactly 32 response tokens: EOS is in the policy's `generation_config.suppress_tokens` (written into the model
  folder by `build_models`, so `training_rl.py` samples the same way) and TRL has no stop token;
- 4 PPO epochs of 4 minibatches of 4 (one optimizer step per minibatch: 16 per PPO step), AdamW (fused, no weight
  decay), learning rate 1.41e-5 constant, temperature 1, seed 0.

What TRL 1.12 computes differently (its design, not a setting; docs/ppo.md "Differences from TRL"):
- `peft_config` wraps the policy in LoRA; the reference is the same network under `disable_adapter()` (no copy);
- the value model is a *separate* `AutoModelForSequenceClassification` (here: loaded from the reward model, as
  TRL's `examples/scripts/ppo/ppo.py` does) and is trained in full: every minibatch runs a second decoder forward
  and a full-weight backward, and AdamW updates its 3.4M parameters (ours: a linear value head on the policy's
  last hidden state);
- old log-probs come from the generation scores (`output_scores=True`), not from a separate forward;
- the reward model scores the policy's token ids as they are (ours decodes, re-tokenizes and appends EOS);
- no gradient clipping (ours clips to 1.0), per-minibatch entropy over the vocabulary in the update.

Phases (seconds per PPO step, measured by wrapping TRL's module-level functions; nothing else is changed):
`generate` (batch_generation, with the scores), `ref` (reference forward, no grad), `value` (value model forward,
no grad), `score` (reward model), `update` (from the first forward with gradients to the end of the step),
split into `update_forward`, `update_backward`, `update_optimizer`; `other` = step - the rest (GAE, masks,
TRL's gc.collect() calls, logging). A step is timed from the end of the previous one (`on_step_end`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

from _setup import ROOT, patched  # first: the repository on sys.path, offline, passive OpenMP

# this script only: no telemetry, no W&B from TRL's Trainer
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

PHASES = ["generate", "score", "ref", "value", "update", "update_forward", "update_backward", "update_optimizer",
          "other"]


def build_models(work_dir: str, seed: int = 0) -> tuple[str, str]:
    """The tiny policy (EOS suppressed in its generation config) and a reward model on the same weights."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GenerationConfig,
    )

    from common import tiny_model

    tiny, rm = os.path.join(work_dir, "tiny"), os.path.join(work_dir, "rm")
    if not os.path.isfile(os.path.join(tiny, "config.json")):
        tiny_model.main(["--output_dir", tiny])
    tok = AutoTokenizer.from_pretrained(tiny)
    gen = GenerationConfig.from_pretrained(tiny)
    gen.suppress_tokens = [tok.eos_token_id]  # every response runs to its full length, on both sides
    gen.save_pretrained(tiny)
    if not os.path.isfile(os.path.join(rm, "config.json")):  # as tests/test_ppo.py `_save_reward_model`
        torch.manual_seed(seed)
        tok.pad_token = tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(rm)
        tok.save_pretrained(rm)
    return tiny, rm


def ordered_prompts(tokenizer, data_file: str, seed: int, max_prompt_length: int = 256) -> list[list[int]]:
    """Prompt ids in the order our PPOTrainer.next_prompts takes them in its first pass (seed + data_epoch 0)."""
    import torch

    from common.prompts import format_prompt

    with open(data_file, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()]
    ids = [tokenizer(format_prompt(q))["input_ids"] for q in questions]
    ids = [x for x in ids if len(x) <= max_prompt_length]
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    return [ids[i] for i in order]


def loadavg() -> list[str]:
    """1, 5 and 15 minute load averages, as /proc/loadavg writes them."""
    return [f"{x:.2f}" for x in os.getloadavg()]


def gate() -> None:
    """Tell the driver this process is ready for its next step, and wait until it says go (one line on stdin)."""
    print("GATE", flush=True)
    sys.stdin.readline()


class PhaseTimer:
    """Seconds per named phase, per step."""

    def __init__(self):
        self.current: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def wrap(self, fn, name_of):
        """`fn` timed under the phase name `name_of(*args, **kwargs)` returns (None: not timed)."""
        def timed(*args, **kwargs):
            name = name_of(*args, **kwargs)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if name:
                    self.add(name, time.perf_counter() - t)
        return timed

    def take(self) -> dict[str, float]:
        out, self.current = self.current, {}
        return out


def parse(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="tiny policy folder (default: built in --work_dir)")
    p.add_argument("--reward_model", help="reward model folder (default: built in --work_dir)")
    p.add_argument("--work_dir", help="where to build the models and write TRL's output (default: a temporary folder)")
    p.add_argument("--data_file", default=os.path.join(ROOT, "data", "rl", "train.jsonl"))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--mini_batch_size", type=int, default=4)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--response_length", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1.41e-5)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=1, help="PPO steps run before timing")
    p.add_argument("--steps", type=int, default=5, help="timed PPO steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate", action="store_true",
                   help="before each step print a line starting GATE and wait for a line on stdin "
                        "(benchmarks/ppo_vs_trl.py uses it to run one step of each side in turn); "
                        "the wait is not timed")
    return p.parse_args(argv)


def load_models(args) -> tuple:
    """(tokenizer, policy, value model, reward model), float32; the value model starts from the reward model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as common.modeling.load_tokenizer
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if tok.eos_token_id not in (policy.generation_config.suppress_tokens or []):
        raise SystemExit(f"{args.model}/generation_config.json does not suppress EOS: build it with build_models")
    value_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1,
                                                                     dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1,
                                                                      dtype=torch.float32)
    for m in (policy, value_model, reward_model):
        m.config.pad_token_id = tok.pad_token_id
    return tok, policy, value_model, reward_model


def build_trainer(args, work_dir: str, tok, policy, value_model, *, reward_model):
    """TRL's PPOTrainer on the setup (module docstring), its dataloader giving the prompts in our trainer's order."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    n_steps = args.warmup + args.steps
    prompts = ordered_prompts(tok, args.data_file, args.seed)[: n_steps * args.batch_size]
    if len(prompts) < n_steps * args.batch_size:
        raise SystemExit(f"{len(prompts)} prompts are fewer than {n_steps} steps x {args.batch_size}")
    train_dataset = Dataset.from_dict({"input_ids": prompts})
    config = PPOConfig(
        output_dir=os.path.join(work_dir, "trl_ppo_out"),
        # batch = per_device_train_batch_size x gradient_accumulation_steps = 16; 4 minibatches of 4; with
        # gradient_accumulation_steps 1 the micro-batch loop runs once per minibatch (rows [0:16] of 4 rows) and
        # accelerate steps the optimizer after every minibatch, as ours does with --gradient_accumulation_steps 1.
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=args.batch_size // args.mini_batch_size,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=n_steps * args.batch_size,
        # one generate() / no-grad forward of the whole batch, as ours
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.response_length,
        stop_token=None,
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch_fused",
        weight_decay=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                             lora_dropout=args.lora_dropout, target_modules="all-linear", bias="none")
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
                         train_dataset=train_dataset, value_model=value_model, eval_dataset=train_dataset,
                         peft_config=peft_config)
    # The prompts in our trainer's order (TRL's own loader shuffles with its seed): the same batches on both sides.
    trainer.dataloader = trainer.accelerator.prepare(DataLoader(
        train_dataset, batch_size=args.batch_size, shuffle=False, collate_fn=DataCollatorWithPadding(tok),
        drop_last=True))
    return trainer


@contextlib.contextmanager
def timed_phases(trainer, timer: PhaseTimer, marks: dict, widths: list[int]):
    """For the block: phase timers wrapped around the functions train() calls (what they compute is unchanged), the
    start of each update in `marks["update_start"]`, each step's padded prompt width appended to `widths` (the same
    as ours when the prompts are the same). The originals are back after the block."""
    import torch
    from accelerate.optimizer import AcceleratedOptimizer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    unwrapped_value = trainer.accelerator.unwrap_model(trainer.model).value_model

    def generation_phase(model, queries, *a, **k):
        widths.append(queries.shape[1])
        return "generate"

    def forward_phase(model, *a, **k):
        if torch.is_grad_enabled():
            if marks["update_start"] is None:
                marks["update_start"] = time.perf_counter()
            return "update_forward"
        return "ref"

    with patched(
        (ppo_module, "batch_generation", timer.wrap(ppo_module.batch_generation, generation_phase)),
        (ppo_module, "forward", timer.wrap(ppo_module.forward, forward_phase)),
        (ppo_module, "get_reward", timer.wrap(ppo_module.get_reward,
                                              lambda model, *a, **k: "value" if model is unwrapped_value else "score")),
        (trainer.accelerator, "backward", timer.wrap(trainer.accelerator.backward, lambda *a, **k: "update_backward")),
        (AcceleratedOptimizer, "step", timer.wrap(AcceleratedOptimizer.step, lambda *a, **k: "update_optimizer")),
    ):
        yield


def step_times(args, timer: PhaseTimer, marks: dict, steps: list[dict], log_entries: list[dict]):
    """The callback that closes each step: its wall and CPU seconds and phase split appended to `steps` (timed from
    the end of the previous step; under `--gate` the wait for the driver's go is not timed), TRL's logs to
    `log_entries`."""
    from transformers import TrainerCallback

    n_steps = args.warmup + args.steps

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if args.gate:
                gate()
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_log(self, _args, state, control, logs=None, **k):
            log_entries.append(dict(logs or {}))

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            ph = timer.take()
            ph["update"] = now - marks["update_start"]
            total = now - self.last
            ph["other"] = total - sum(ph.get(k, 0.0) for k in ("generate", "score", "ref", "value", "update"))
            steps.append({"total": total, "cpu_s": time.process_time() - self.last_cpu,
                          **{k: ph.get(k, 0.0) for k in PHASES}})
            marks["update_start"] = None
            if args.gate and len(steps) < n_steps:
                gate()
                now = time.perf_counter()
            self.last, self.last_cpu = now, time.process_time()

    return StepTimes()


def report(args, trainer, steps: list[dict], log_entries: list[dict], widths: list[int], *, load_s: float,
           load_avg_start: list[str]) -> dict:
    """The JSON line of TRL's side; a warning on stderr if EOS was sampled."""
    import torch
    import transformers
    import trl

    timed = steps[args.warmup :]
    eos_counts = [entry["val/num_eos_tokens"] for entry in log_entries if "val/num_eos_tokens" in entry]
    if any(c for c in eos_counts):
        print(f"warning: EOS sampled ({eos_counts}); responses are still {args.response_length} tokens "
              "(no stop token)", file=sys.stderr)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    med = {k: statistics.median(s[k] for s in timed) for k in ["total", *PHASES]}
    return {
        "side": "trl",
        "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "batch_size": args.batch_size, "response_length": args.response_length,
        "warmup_steps": args.warmup, "timed_steps": len(timed),
        "episodes_per_s": args.batch_size / med["total"],
        "step_s_median": med["total"],
        "phases_s_median": {k: med[k] for k in PHASES},
        "step_s_all": [round(s["total"], 4) for s in timed],
        "steps": [{k: round(v, 4) for k, v in s.items()} for s in steps],
        "trl_eps_last": next((e["eps"] for e in reversed(log_entries) if "eps" in e), None),
        "eos_tokens_per_step": eos_counts,
        "prompt_width_per_step": widths,
        "trainable_params": n_trainable,
        "load_s": load_s,
        "loadavg_start": load_avg_start, "loadavg_end": loadavg(),
    }


def import_libraries() -> None:
    """Every library the run uses, imported before anything is built or timed (`load_s` counts no imports); a
    warning when TRL is not 1.12, and the ImportError of a TRL with no PPOTrainer (1.13+) before any model is built."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl
    from accelerate.optimizer import AcceleratedOptimizer  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainerCallback,
    )

    if not trl.__version__.startswith("1.12."):
        print(f"warning: trl {trl.__version__}, not 1.12 (run in the venv of the module docstring)", file=sys.stderr)
    import trl.experimental.ppo  # noqa: F401


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    import_libraries()
    load_avg_start = loadavg()
    tmp = None
    work_dir = args.work_dir
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="trl_ppo_baseline_")
        work_dir = tmp.name
    os.makedirs(work_dir, exist_ok=True)
    if args.model is None or args.reward_model is None:
        tiny, rm = build_models(work_dir, args.seed)
        args.model, args.reward_model = args.model or tiny, args.reward_model or rm

    t_load = time.perf_counter()
    trainer = build_trainer(args, work_dir, *load_models(args))
    timer, marks = PhaseTimer(), {"update_start": None}
    steps: list[dict] = []
    log_entries: list[dict] = []
    widths: list[int] = []  # padded prompt width per step
    with timed_phases(trainer, timer, marks, widths):
        trainer.add_callback(step_times(args, timer, marks, steps, log_entries))
        load_s = time.perf_counter() - t_load
        trainer.train()

    result = report(args, trainer, steps, log_entries, widths, load_s=load_s, load_avg_start=load_avg_start)
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
