"""Throughput and memory of each stage against the bare PyTorch limit, on an offline random Llama.

    python benchmarks/run.py --quick                        # smaller model, fewer repetitions
    python benchmarks/run.py --output results.json          # the full run (larger model, more repetitions)

For each stage the project's real training path and a bare PyTorch loop doing the same arithmetic on the same
model and the same batches run in the same process, one step of each in turn (so load from other jobs hits both
alike), after warm-up steps. A stage's `ratio_to_bare` is the median over steps of bare step time / our step time,
each pair on the same batch: our throughput as a share of the bare loop's.

- SFT: `training_sft.py`'s objects (its DEFAULTS and device defaults, wrapped packing, completion-only loss, LoRA,
  `training_sft.tokenize`) driving `SFTTrainer`; a callback times each optimizer step (data loading, logging and
  the metrics callback included) and runs one bare step (forward, cross-entropy on the answer tokens, backward,
  gradient clipping, AdamW) on a second copy of the model with the same LoRA, on the batch our step just used.
  Unit: trained tokens per second (batch x sequence length).
- RM: `training_reward_model.py`'s objects driving `RewardTrainer`, against a bare pairwise loop (forward of chosen
  and rejected in one batch, -logsigmoid(r_j - r_k), backward, clipping, AdamW). Unit: pairs per second.
- PPO: `common.ppo.PPOTrainer.step()` built as `training_rl.py` builds it, against a bare PPO step written here
  (generate with the KV cache, score the token ids with the reward model, policy/value and reference forwards,
  rewards, GAE, `ppo_epochs` of minibatch forward/backward) on the same model, prompts and response length (EOS is
  suppressed, so every response is exactly `--output_max_length` tokens on both sides). Unit: episodes per second,
  split into generate / score / train. It runs in a child process, whose peak resident memory, divided by the
  bytes of the policy + reward model weights, is `ppo.peak_rss_over_weights`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _setup import ROOT  # first: the repository on sys.path, offline, passive OpenMP

# Sizes per profile. "tiny" is the test's (smallest that exercises every path); "quick" a short run; "full" the
# published run; "gpu" the full run's shape on a GPU with a larger model. Run times: benchmarks/README.md.
PROFILES = {
    "tiny": dict(hidden=128, layers=2, heads=4, sft_seq=128, sft_bs=4, rm_bs=4, rm_max_length=512,
                 ppo_bs=4, ppo_mini=1, ppo_ga=2, ppo_epochs=2, ppo_len=8, warmup=1, reps=3, ppo_warmup=1, ppo_reps=3),
    "quick": dict(hidden=384, layers=6, heads=6, sft_seq=256, sft_bs=4, rm_bs=4, rm_max_length=512,
                  ppo_bs=8, ppo_mini=1, ppo_ga=4, ppo_epochs=4, ppo_len=24, warmup=1, reps=9, ppo_warmup=1, ppo_reps=7),
    "full": dict(hidden=512, layers=8, heads=8, sft_seq=512, sft_bs=4, rm_bs=4, rm_max_length=512,
                 ppo_bs=16, ppo_mini=1, ppo_ga=4, ppo_epochs=4, ppo_len=48, warmup=3, reps=12, ppo_warmup=1,
                 ppo_reps=5),
    "gpu": dict(hidden=1024, layers=12, heads=16, sft_seq=1024, sft_bs=8, rm_bs=8, rm_max_length=512,
                ppo_bs=32, ppo_mini=4, ppo_ga=2, ppo_epochs=4, ppo_len=64, warmup=3, reps=15, ppo_warmup=1, ppo_reps=5),
}


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------------


def summary(times: list[float]) -> dict:
    """Median, min, max and interquartile range of step times (seconds)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "q1_s": q[0], "q3_s": q[2], "n": len(times), "all_s": [round(t, 5) for t in times]}


def compare(ours: list[float], bare: list[float], work_per_step: float, unit: str) -> dict:
    """Throughputs and ratios of two interleaved series of step times doing `work_per_step` units each."""
    o, b = summary(ours), summary(bare)
    o[f"{unit}_per_s"] = work_per_step / o["median_s"]
    b[f"{unit}_per_s"] = work_per_step / b["median_s"]
    paired = sorted(bt / ot for ot, bt in zip(ours, bare))  # step i of each ran back to back
    return {
        "ours": o, "bare": b, f"{unit}_per_step": work_per_step,
        # Median over steps of bare/ours on the same batch: robust to batches of different lengths (RM) and to
        # load that drifts during the run.
        "ratio_to_bare": statistics.median(paired),
        "ratio_of_medians": b["median_s"] / o["median_s"],
        "ratio_to_bare_best": b["min_s"] / o["min_s"],  # least disturbed step of each
        "ratio_paired_range": [paired[0], paired[-1]],
    }


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


class RssSampler(threading.Thread):
    """Peak resident memory per phase, sampled every few milliseconds (ru_maxrss only knows the whole process)."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval, self.phase, self.peaks = psutil.Process(), interval, "setup", {}
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            rss = self.proc.memory_info().rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join()


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def vmhwm_bytes() -> int | None:
    """This process's peak resident memory: VmHWM, the high-water mark of its address space, which (unlike
    ru_maxrss) starts afresh at exec, so the parent's memory at fork does not count. None where /proc has none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def peak_rss_bytes(sampler: RssSampler) -> int:
    """VmHWM (``vmhwm_bytes``), else the sampled peak."""
    peak = vmhwm_bytes()
    return peak if peak is not None else max(sampler.peaks.values())


def tensor_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


def build_models(folder: str, p: dict, vocab_size: int) -> dict:
    """A random Llama (policy/SFT base) and a reward model with a saved random `score` head, both offline."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from common.tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer(os.path.join(ROOT, "data"), vocab_size)
    if len(tokenizer) < vocab_size:  # BPE on the sample data stops near 6k tokens; pad to a real model's vocabulary
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab_size - len(tokenizer))])
    model = build_model(tokenizer, p["hidden"], p["layers"], p["heads"], seed=0)
    base = os.path.join(folder, "base")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.config.pad_token_id = tokenizer.eos_token_id
    rm_dir = os.path.join(folder, "rm")
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    return {"base": base, "rm": rm_dir, "params": sum(t.numel() for t in model.parameters()),
            "weight_bytes": tensor_bytes(model), "hidden_size": p["hidden"], "layers": p["layers"],
            "heads": p["heads"], "vocab_size": len(tokenizer)}


# ----------------------------------------------------------------------------------------------------------------
# SFT and RM: the Trainer's steps, with one bare step run after each from a callback
# ----------------------------------------------------------------------------------------------------------------


class Interleaver:
    """A `TrainerCallback` that times each optimizer step of the Trainer and runs one bare step after it.

    Our step i lasts from the end of the previous callback to `on_step_end` of step i: data loading, forward,
    backward, clipping, optimizer and scheduler steps, and the logging of step i-1 (which the Trainer does right
    after `on_step_end`). The bare step uses the batch our step trained on (captured at the collator, first in,
    first out, as accelerate's loader collates one batch ahead)."""

    def __init__(self, name: str, bare_step, warmup: int, device):
        from transformers import TrainerCallback

        self.name, self.bare_step, self.warmup, self.device = name, bare_step, warmup, device
        self.batches = collections.deque()
        self.ours, self.bare = [], []
        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.resume = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(outer.device)
                t = time.perf_counter()
                batch = outer.batches.popleft()
                outer.bare_step(batch)  # warm-up for the first steps, timed after
                sync(outer.device)
                t2 = time.perf_counter()
                warm = state.global_step <= outer.warmup
                if not warm:
                    outer.ours.append(t - outer.resume)
                    outer.bare.append(t2 - t)
                log(f"{outer.name} step {state.global_step}{' (warm-up)' if warm else ''}: "
                    f"ours {t - outer.resume:.3f} s, bare {t2 - t:.3f} s")
                outer.resume = time.perf_counter()

        self.callback = Callback()

    def capture(self, collator):
        def collate(features):
            batch = collator(features)
            self.batches.append({k: v for k, v in batch.items()})
            return batch

        return collate

    def train(self, trainer) -> None:
        """``trainer.train()``, each of its steps followed by the bare step on the same batch."""
        trainer.data_collator = self.capture(trainer.data_collator)
        trainer.add_callback(self.callback)
        trainer.train()


def bare_optimizer_step(params, opt, max_grad_norm) -> None:
    """Clip (if asked), step, clear: the end of every bare training step."""
    import torch

    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def bare_optimizer(params, lr: float, weight_decay: float, device):
    import torch

    # The fastest AdamW torch has for the device (what Trainer picks too: adamw_torch_fused)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def build_sft(models: dict, p: dict, out_dir: str):
    """(SFTTrainer as training_sft.main builds it, a bare step on a second copy of the model, the config)."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model

    import training_sft
    from common.layouts import load_normalized
    from common.modeling import load_model, load_tokenizer, lora_config
    from common.outputs import MetricsWriter, metrics_callback, nonfinite_guard

    steps = p["warmup"] + p["reps"]
    script, config, model_args = training_sft.parse([
        "--model_name_or_path", models["base"], "--dataset_name", ROOT, "--subset", "data/finetune",
        "--size_valid_set", "0", "--seq_length", str(p["sft_seq"]), "--batch_size", str(p["sft_bs"]),
        "--max_steps", str(steps), "--output_dir", os.path.join(out_dir, "sft"), "--save_strategy", "no",
        "--eval_strategy", "no", "--disable_tqdm", "true",
    ])
    # As training_sft.main does, minus saving and evaluation.
    loaded, _ = load_normalized("sft", script.dataset_name, script.subset, script.split)
    train_rows, _ = training_sft.split_valid(loaded, script)
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code, "right")
    train_ds = training_sft.tokenize(train_rows, tokenizer, False)
    writer = MetricsWriter(config.output_dir)
    trainer = training_sft.build_trainer(script, config, model_args, tokenizer, train_ds,
                                         callbacks=[nonfinite_guard(), metrics_callback(writer)])
    device = trainer.args.device

    bare_model = get_peft_model(load_model(model_args, "CAUSAL_LM", False, tokenizer.pad_token_id),
                                lora_config(model_args, "CAUSAL_LM"))
    bare_model.to(device).train()
    if trainer.args.gradient_checkpointing:  # the same arithmetic as ours: recompute included
        bare_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [q for q in bare_model.parameters() if q.requires_grad]
    opt = bare_optimizer(params, config.learning_rate, config.weight_decay, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if trainer.args.bf16 else contextlib.nullcontext()

    def bare_step(batch):
        input_ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        with autocast:
            logits = bare_model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        bare_optimizer_step(params, opt, config.max_grad_norm)

    bare_step.params = params
    bare_step.script = script
    return trainer, bare_step, config, model_args


def bench_sft(models: dict, p: dict, out_dir: str) -> dict:
    trainer, bare_step, config, model_args = build_sft(models, p, out_dir)
    device, params = trainer.args.device, bare_step.params
    inter = Interleaver("SFT", bare_step, p["warmup"], device)
    inter.train(trainer)
    tokens_per_step = p["sft_bs"] * p["sft_seq"]
    result = compare(inter.ours, inter.bare, tokens_per_step, "tokens")
    result["config"] = {"seq_length": p["sft_seq"], "batch_size": p["sft_bs"],
                        "packing_strategy": config.packing_strategy,
                        "completion_only_loss": config.completion_only_loss, "lora_r": model_args.lora_r,
                        "bf16": bool(trainer.args.bf16), "gradient_checkpointing": trainer.args.gradient_checkpointing,
                        "logging_steps": config.logging_steps, "optim": str(config.optim),
                        "lm_head": bare_step.script.lm_head}
    result["trainable_params"] = sum(q.numel() for q in params)
    del trainer
    return result


def build_rm(models: dict, p: dict, out_dir: str):
    """(RewardTrainer as training_reward_model.main builds it, a bare step on a second copy, the config)."""
    import torch
    import torch.nn.functional as F
    from peft import get_peft_model
    from transformers import set_seed

    import training_reward_model as rm_script
    from common.modeling import load_model, load_tokenizer, lora_config
    from common.outputs import MetricsWriter, metrics_callback, nonfinite_guard

    steps = p["warmup"] + p["reps"]
    script, config, model_args = rm_script.parse([
        "--model_name_or_path", models["base"], "--dataset_name", ROOT,
        "--per_device_train_batch_size", str(p["rm_bs"]), "--max_length", str(p["rm_max_length"]),
        "--train_subset", str(max(64, 4 * steps * p["rm_bs"])), "--eval_subset", "16",
        "--max_steps", str(steps), "--output_dir", os.path.join(out_dir, "rm"), "--save_strategy", "no",
        "--eval_strategy", "no", "--disable_tqdm", "true",
    ])
    # As training_reward_model.main does, minus evaluation, the report and saving.
    config.per_device_eval_batch_size = config.per_device_eval_batch_size or config.per_device_train_batch_size
    train_rows, _ = rm_script.load_rows(script, script.train_data_dir, script.train_subset)
    tokenizer = load_tokenizer(model_args.model_name_or_path, config.trust_remote_code, "right")
    if config.eos_token:
        tokenizer.eos_token = config.eos_token
    train_ds, _ = rm_script.tokenize_pairs(train_rows, tokenizer, script, config.max_length, "train", verbose=False)
    writer = MetricsWriter(config.output_dir)
    trainer = rm_script.build_trainer(config, model_args, tokenizer, train_ds,
                                      callbacks=[nonfinite_guard(), metrics_callback(writer)])
    device = trainer.args.device

    set_seed(config.seed)
    bare_model = get_peft_model(load_model(model_args, "SEQ_CLS", False, tokenizer.pad_token_id),
                                lora_config(model_args, "SEQ_CLS"))
    bare_model.to(device).train()
    if trainer.args.gradient_checkpointing:  # the same arithmetic as ours: recompute included
        bare_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [q for q in bare_model.parameters() if q.requires_grad]
    opt = bare_optimizer(params, config.learning_rate, config.weight_decay, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if trainer.args.bf16 else contextlib.nullcontext()

    def bare_step(batch):
        input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with autocast:
            rewards = bare_model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits.squeeze(-1).float()
        r_chosen, r_rejected = rewards.chunk(2)
        loss = -F.logsigmoid(r_chosen - r_rejected).mean()
        loss.backward()
        bare_optimizer_step(params, opt, config.max_grad_norm)

    bare_step.params = params
    return trainer, bare_step, config, model_args


def bench_rm(models: dict, p: dict, out_dir: str) -> dict:
    trainer, bare_step, config, model_args = build_rm(models, p, out_dir)
    device, params = trainer.args.device, bare_step.params
    inter = Interleaver("RM", bare_step, p["warmup"], device)
    inter.train(trainer)
    result = compare(inter.ours, inter.bare, p["rm_bs"], "pairs")
    result["config"] = {"batch_size": p["rm_bs"], "max_length": config.max_length, "lora_r": model_args.lora_r,
                        "lora_dropout": model_args.lora_dropout, "bf16": bool(trainer.args.bf16),
                        "gradient_checkpointing": trainer.args.gradient_checkpointing,
                        "logging_steps": config.logging_steps}
    result["trainable_params"] = sum(q.numel() for q in params)
    del trainer
    return result


# ----------------------------------------------------------------------------------------------------------------
# PPO: PPOTrainer.step() and a bare PPO step on the same model, in turn (run in a child process, for its memory)
# ----------------------------------------------------------------------------------------------------------------


def build_ppo_trainer(models: dict, p: dict, out_dir: str):
    """`PPOTrainer` built by `training_rl.build_trainer`, as `training_rl.main` builds it."""
    from accelerate.utils import set_seed

    import training_rl
    from common.modeling import load_tokenizer

    L = p["ppo_len"]
    a, config, model_args = training_rl.parse([
        "--model_name", models["base"], "--reward_model_name", models["rm"], "--dataset_name", ROOT,
        "--subset", "data/rl", "--batch_size", str(p["ppo_bs"]), "--mini_batch_size", str(p["ppo_mini"]),
        "--gradient_accumulation_steps", str(p["ppo_ga"]), "--ppo_epochs", str(p["ppo_epochs"]),
        "--output_min_length", str(L), "--output_max_length", str(L), "--output_dir", os.path.join(out_dir, "ppo"),
        "--steps", str(p["ppo_bs"] * 1000),
    ])
    training_rl.check_args(a, config, model_args)
    accelerator = training_rl.make_accelerator(a)
    set_seed(config.seed)
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path, a.trust_remote_code, "left")
    prompts, _, _ = training_rl.load_prompts(a, tokenizer)
    return training_rl.build_trainer(a, config, model_args, accelerator, tokenizer, prompts=prompts), config


def left_pad(prompts: list[list[int]], rows: int, pad: int):
    """(ids, attention mask, width P) of ``rows`` prompts left-padded to the longest, on the CPU."""
    import torch

    P = max(map(len, prompts))
    ids = torch.full((rows, P), pad, dtype=torch.long)
    attn = torch.zeros((rows, P), dtype=torch.long)
    for i, q in enumerate(prompts):
        ids[i, P - len(q):] = torch.tensor(q)
        attn[i, P - len(q):] = 1
    return ids, attn, P


def bare_gae(rewards, values, gamma: float, lam: float):
    """(advantages, returns) by GAE of per-token rewards and values [B, L]; the episode ends after the last token."""
    import torch

    B, L = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, device=rewards.device)
    for t in reversed(range(L)):
        next_v = values[:, t + 1] if t + 1 < L else 0.0
        last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv, adv + values


def make_bare_ppo(trainer, a):
    """A bare PPO step in plain PyTorch on the trainer's own policy, value head and reward model (no second copy:
    the memory figure stays that of one run), with its own AdamW over the same trainable parameters."""
    import torch
    import torch.nn.functional as F

    acc, hp = trainer.accelerator, trainer.config
    device = acc.device
    model = acc.unwrap_model(trainer.model)
    policy, value_head, rm = model.policy, model.value_head, trainer.reward_model
    lm = policy.get_base_model()
    decoder, lm_head = lm.get_decoder(), lm.get_output_embeddings()
    eos, pad = trainer.tokenizer.eos_token_id, trainer.tokenizer.pad_token_id
    params = [q for q in model.parameters() if q.requires_grad]
    opt = bare_optimizer(params, a.learning_rate, 0.0, device)
    B, L, T = hp.batch_size, hp.output_max_length, hp.temperature

    def forward(ids, attn, pos, P):
        h = decoder(input_ids=ids, attention_mask=attn, position_ids=pos,
                    use_cache=False).last_hidden_state[:, P - 1 : -1]
        logits = lm_head(h).float() / T
        logp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, P:].unsqueeze(-1)).squeeze(-1)
        return logp, value_head(h.float()).squeeze(-1)

    def step(batch):
        t0 = time.perf_counter()
        ids, attn, P = left_pad([row["input_ids"] for row in batch], B, pad)
        ids, attn = ids.to(device), attn.to(device)
        policy.eval()
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0, temperature=T,
                                  max_new_tokens=L, eos_token_id=eos, pad_token_id=pad, use_cache=True)
        policy.train()
        sync(device)
        t1 = time.perf_counter()
        # Score: the reward model shares the policy's tokenizer here, so the ids go in as they are, ended with EOS.
        full_attn = torch.cat([attn, torch.ones((B, L), dtype=attn.dtype, device=device)], 1)
        with torch.no_grad():
            rm_ids = torch.cat([out, torch.full((B, 1), eos, device=device)], 1)
            rm_attn = torch.cat([full_attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], 1)
            scores = torch.cat([rm(input_ids=rm_ids[s : s + hp.reward_batch_size],
                                   attention_mask=rm_attn[s : s + hp.reward_batch_size]).logits[:, 0]
                                for s in range(0, B, hp.reward_batch_size)]).float()
        sync(device)
        t2 = time.perf_counter()
        pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            old_logp, old_values = forward(out, full_attn, pos, P)
            with policy.disable_adapter():
                ref_logp, _ = forward(out, full_attn, pos, P)
            rewards = -trainer.kl_ctl.value * (old_logp - ref_logp)
            rewards[:, -1] += scores
            adv, returns = bare_gae(rewards, old_values, hp.gamma, hp.lam)
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        mb, ga = hp.mini_batch_size, hp.gradient_accumulation_steps
        for _ in range(hp.ppo_epochs):
            perm = torch.randperm(B, device=device)
            for start in range(0, B, mb * ga):
                for k in range(ga):
                    i = perm[start + k * mb : start + (k + 1) * mb]
                    logp, v = forward(out[i], full_attn[i], pos[i], P)
                    ratio = torch.exp(logp - old_logp[i])
                    pg_loss = torch.max(-adv[i] * ratio,
                                        -adv[i] * ratio.clamp(1 - hp.cliprange, 1 + hp.cliprange)).mean()
                    v_clipped = old_values[i] + (v - old_values[i]).clamp(-hp.cliprange_value, hp.cliprange_value)
                    v_loss = 0.5 * torch.max((v - returns[i]) ** 2, (v_clipped - returns[i]) ** 2).mean()
                    ((pg_loss + hp.vf_coef * v_loss) / ga).backward()
                bare_optimizer_step(params, opt, hp.max_grad_norm)
        sync(device)
        t3 = time.perf_counter()
        return {"generate": t1 - t0, "score": t2 - t1, "train": t3 - t2, "total": t3 - t0}

    return step


def bench_ppo(models: dict, p: dict, out_dir: str) -> dict:
    """Both PPO steps in turn, after warm-up; peak resident memory of this process while each runs."""
    import accelerate  # noqa: F401  (every library the run loads, before the baseline is sampled)
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification  # noqa: F401

    import training_rl  # noqa: F401

    sampler = RssSampler()
    sampler.start()
    sampler.phase = "baseline"  # imports done, no model loaded yet
    time.sleep(0.05)
    sampler.phase = "load"
    log("PPO: loading")
    trainer, a = build_ppo_trainer(models, p, out_dir)
    # No EOS ever, on both sides: every response is exactly output_max_length tokens, so both do equal work. Ours
    # samples with no EOS id; the bare loop's generate suppresses it through the model's generation_config.
    trainer.eos_ids = []
    lm = trainer.accelerator.unwrap_model(trainer.model).lm()
    lm.generation_config.suppress_tokens = [trainer.tokenizer.eos_token_id]
    bare_step = make_bare_ppo(trainer, a)
    prompts_used = []
    next_prompts = trainer.next_prompts
    trainer.next_prompts = lambda: prompts_used.append(next_prompts()) or prompts_used[-1]

    ours, bare = [], []
    for i in range(p["ppo_warmup"] + p["ppo_reps"]):
        log(f"PPO step {i + 1}/{p['ppo_warmup'] + p['ppo_reps']}" + (" (warm-up)" if i < p["ppo_warmup"] else ""))
        sampler.phase = "ours"
        sync(trainer.accelerator.device)
        t0 = time.perf_counter()
        metrics, _ = trainer.step()
        sync(trainer.accelerator.device)
        total = time.perf_counter() - t0
        assert metrics["response/length_mean"] == a.output_max_length, metrics["response/length_mean"]
        sampler.phase = "bare"
        b = bare_step(prompts_used[-1])
        if i >= p["ppo_warmup"]:
            ours.append({"generate": metrics["time/generate"], "score": metrics["time/score"],
                         "train": metrics["time/train"], "total": total})
            bare.append(b)
    sampler.phase = "done"
    time.sleep(0.02)
    sampler.stop()

    result = compare([o["total"] for o in ours], [b["total"] for b in bare], a.batch_size, "episodes")
    for side, runs in (("ours", ours), ("bare", bare)):
        for part in ("generate", "score", "train"):
            result[side][f"{part}_s_median"] = statistics.median(r[part] for r in runs)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    weights = tensor_bytes(unwrapped) + tensor_bytes(trainer.reward_model)
    peak = peak_rss_bytes(sampler)
    baseline = sampler.peaks.get("baseline", 0)
    result.update({
        "weight_bytes": weights,
        "peak_rss_bytes": peak,
        "peak_rss_over_weights": peak / weights,
        "baseline_rss_bytes": baseline,  # after the imports, before any model: Python, torch, transformers
        "peak_rss_above_baseline_over_weights": (peak - baseline) / weights,
        "phase_peak_rss_bytes": dict(sampler.peaks),
        "config": {"batch_size": a.batch_size, "mini_batch_size": a.mini_batch_size,
                   "gradient_accumulation_steps": a.gradient_accumulation_steps, "ppo_epochs": a.ppo_epochs,
                   "response_length": a.output_max_length, "reward_batch_size": a.reward_batch_size,
                   "prompt_tokens_mean": statistics.mean(len(r["input_ids"]) for batch in prompts_used for r in batch)},
    })
    if torch.cuda.is_available():
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def bench_ppo_memory(models: dict, p: dict, out_dir: str) -> dict:
    """Our PPO steps alone (no bare loop in the process): the peak resident memory of a step above what the loaded
    models and the process already held. With a real vocabulary (``--vocab_size 32000``) the log-softmax over it
    is what a step's peak is made of."""
    import torch

    import training_rl  # noqa: F401  (libraries loaded before the first sample)

    sampler = RssSampler()
    sampler.start()
    trainer, a = build_ppo_trainer(models, p, out_dir)
    trainer.eos_ids = []  # every response is exactly output_max_length tokens
    trainer.step()  # warm-up: allocator pools, lazy inits
    torch.set_num_threads(torch.get_num_threads())
    loaded = peak_rss_bytes(sampler)  # after the models, the optimizer and one step
    steps = []
    for _ in range(p["ppo_reps"]):
        t0 = time.perf_counter()
        metrics, _ = trainer.step()
        steps.append(time.perf_counter() - t0)
        assert metrics["response/length_mean"] == a.output_max_length
    sampler.stop()
    peak = peak_rss_bytes(sampler)
    return {"peak_rss_bytes": peak, "peak_rss_after_warmup_step_bytes": loaded,
            "step_s_median": statistics.median(steps), "vocab_size": models["vocab_size"],
            "config": {"batch_size": a.batch_size, "mini_batch_size": a.mini_batch_size,
                       "gradient_accumulation_steps": a.gradient_accumulation_steps, "ppo_epochs": a.ppo_epochs,
                       "response_length": a.output_max_length}}


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def run_child(kind: str, models: dict, p: dict, work: str, threads: int) -> dict:
    """A PPO benchmark in a child process of its own, so its peak resident memory is its own."""
    log(f"{kind}: starting the child process")
    spec_path, result_path = os.path.join(work, f"{kind}_spec.json"), os.path.join(work, f"{kind}_result.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump({"kind": kind, "models": models, "profile": p, "out_dir": work, "result": result_path}, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path, "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    log(f"{kind}: child process ended")
    if proc.returncode != 0:
        raise SystemExit(f"error: the {kind} benchmark process exited {proc.returncode}")
    with open(result_path, encoding="utf-8") as f:
        return json.load(f)


def environment(threads: int) -> dict:
    import torch
    import transformers
    import trl

    on_gpu = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(), "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
    }


def print_table(r: dict) -> None:
    env, m = r["environment"], r["model"]
    print(f"\nprofile {r['profile']}: {m['params'] / 1e6:.1f}M-parameter Llama (hidden {m['hidden_size']}, "
          f"{m['layers']} layers, vocab {m['vocab_size']}) on {env['device']}, {env['torch_threads']} torch threads; "
          f"load average {r['load_average_start'][0]:.2f} at start, {r['load_average_end'][0]:.2f} at end")
    rows = [("stage", "unit", "ours /s", "bare /s", "ratio_to_bare", "ratio of medians", "best-step ratio",
             "paired range")]
    for stage, unit in (("sft", "tokens"), ("rm", "pairs"), ("ppo", "episodes")):
        s = r.get(stage)
        if not s:
            continue
        rows.append((stage.upper(), unit, f"{s['ours'][f'{unit}_per_s']:.1f}", f"{s['bare'][f'{unit}_per_s']:.1f}",
                     f"{s['ratio_to_bare']:.3f}", f"{s['ratio_of_medians']:.3f}", f"{s['ratio_to_bare_best']:.3f}",
                     f"{s['ratio_paired_range'][0]:.2f}-{s['ratio_paired_range'][1]:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    if "ppo_memory" in r:
        s = r["ppo_memory"]
        print(f"PPO step alone (vocab {s['vocab_size']}, batch {s['config']['batch_size']}, minibatch "
              f"{s['config']['mini_batch_size']}, {s['config']['response_length']}-token responses): peak RSS "
              f"{s['peak_rss_bytes'] / 2**20:.0f} MiB, {s['peak_rss_after_warmup_step_bytes'] / 2**20:.0f} MiB "
              f"after the first step; {s['step_s_median']:.2f} s per step")
    if "ppo" in r:
        s = r["ppo"]
        for side in ("ours", "bare"):
            print(f"PPO {side}: step {s[side]['median_s']:.3f} s = generate {s[side]['generate_s_median']:.3f} + "
                  f"score {s[side]['score_s_median']:.3f} + train {s[side]['train_s_median']:.3f}")
        print(f"PPO peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB = {s['peak_rss_over_weights']:.1f}x the policy "
              f"+ reward model weights ({s['weight_bytes'] / 2**20:.0f} MiB); "
              f"{s['peak_rss_above_baseline_over_weights']:.1f}x above "
              f"the {s['baseline_rss_bytes'] / 2**20:.0f} MiB of Python + libraries")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")
    parser.add_argument("--quick", action="store_true",
                        help="Smaller model and fewer repetitions.")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test's size: seconds per stage
    parser.add_argument("--stages", default="sft,rm,ppo",
                        help="Comma-separated stages to run: sft, rm, ppo; ppo_memory (our PPO step alone, for its "
                             "peak memory: use with --vocab_size 32000).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: os.cpu_count()).")
    parser.add_argument("--vocab_size", type=int, default=2048, help="Vocabulary of the tokenizer trained on data/.")
    parser.add_argument("--work_dir", default=None,
                        help="Folder for the models and run outputs (default: a temporary one).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: the PPO child process
    args = parser.parse_args(argv)

    import torch

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    if args.worker:  # child: PPO only, results to the given file
        log("PPO child: imports done")
        with open(args.worker, encoding="utf-8") as f:
            spec = json.load(f)
        bench = bench_ppo_memory if spec.get("kind") == "ppo_memory" else bench_ppo
        result = bench(spec["models"], spec["profile"], spec["out_dir"])
        with open(spec["result"], "w", encoding="utf-8") as f:
            json.dump(result, f)
        log("PPO child: done")
        return None

    name = "tiny" if args.tiny else "quick" if args.quick else "gpu" if torch.cuda.is_available() else "full"
    p = PROFILES[name]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"sft", "rm", "ppo", "ppo_memory"}
    if unknown:
        parser.error(f"--stages: unknown {sorted(unknown)}")
    started = time.perf_counter()
    results = {"profile": name, "environment": environment(threads), "load_average_start": list(os.getloadavg())}
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="rlhf-bench-"))
        log(f"building the {name} model in {work}")
        models = build_models(work, p, args.vocab_size)
        results["model"] = {k: v for k, v in models.items() if k not in ("base", "rm")}
        if "sft" in stages:
            log("SFT: loading")
            results["sft"] = bench_sft(models, p, work)
        if "rm" in stages:
            log("RM: loading")
            results["rm"] = bench_rm(models, p, work)
        for kind in ("ppo", "ppo_memory"):
            if kind in stages:
                results[kind] = run_child(kind, models, p, work, threads)
    results["load_average_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - started
    print_table(results)
    print(f"total {results['wall_s']:.0f} s")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
