"""PPO for RLHF, on `accelerate` (DESIGN.md, section PPO; each detail and its source: docs/ppo.md).

Read top to bottom: the math (rewards, GAE, whitening, losses, KL controllers) as plain functions pinned by
unit tests, then the policy with its value head, then ``PPOTrainer``, which holds the state of a run
(optimizer, KL controller, reward statistics, prompt stream, RNG) and does one PPO step at a time:
rollout -> score -> reference and values -> rewards -> advantages -> ``ppo_epochs`` of minibatch updates.

Shapes: ``B`` responses per process, ``R`` response tokens (padded), ``V`` vocabulary, ``H`` hidden size.
Every per-token tensor is ``[B, R]`` and aligned with the response tokens ``a_1..a_R``; ``mask`` is 1 up to and
including the first EOS and 0 after it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import UserError

# ----------------------------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; ``reduce(t)`` sums ``t`` across processes (DDP), if given.

    The variance is the unbiased one of all unmasked tokens of the (global) batch (advantage normalisation: Huang et al. 2022, "37 details", #7).
    """
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if reduce is not None:
        stats = reduce(stats)
    total, total_sq, n = stats.unbind()
    mean = total / n
    var = (total_sq / n - mean**2) * n / (n - 1).clamp(min=1)
    whitened = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean.to(x.dtype)
    return whitened * mask


def compute_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t = -kl_coef * (logp_t - ref_logp_t)``, plus the score on the last response token.

    Ziegler et al. 2019, eq. 2: the KL penalty keeps the policy near the reference. Returns (rewards, kl).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of the last unmasked token (the EOS, if any)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` zero past the last token; ``A_t = delta_t + gamma * lam *
    A_{t+1}``; returns ``R_t = A_t + V_t``. Returns (advantages, returns), zero where masked.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]  # masked tokens carry nothing backwards
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages * mask, returns * mask


def ppo_losses(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
    advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange: float, cliprange_value: float, vf_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate and clipped value loss (Schulman et al. 2017, eq. 7 and 9; CleanRL ``ppo.py``)."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)

    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    v_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses2), mask)

    loss = pg_loss + vf_coef * v_loss
    with torch.no_grad():
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": v_loss.detach(),
            "policy/approxkl": 0.5 * masked_mean(logratio**2, mask),
            "policy/clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "val/clipfrac": masked_mean((vf_losses2 > vf_losses).float(), mask),
        }
    return loss, stats


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: ``kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class RunningMoments:
    """Running mean and std of scores (Chan et al.'s parallel update), to normalise rewards online."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n, mean, var = xs.numel(), xs.mean().item(), xs.var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1)) if self.count > 1 else 1.0


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Policy with value head
# ----------------------------------------------------------------------------------------------------------------


class PolicyWithValueHead(nn.Module):
    """The policy (a causal LM, usually with a LoRA adapter) and a scalar value head on its last hidden state.

    ``forward`` runs the decoder once and applies the LM head and the value head only at the positions that
    predict response tokens (``response_start - 1`` to the second-to-last), so logits are ``[B, R, V]``, not
    ``[B, P + R, V]``.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # as lm-human-preferences: V = 0 until the value loss teaches it
        nn.init.zeros_(self.value_head.bias)

    def lm(self) -> nn.Module:
        """The causal LM under the (optional) peft wrapper; LoRA layers inside it stay active."""
        return self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy

    def forward(self, input_ids, attention_mask, position_ids, response_start: int, temperature: float = 1.0):
        lm = self.lm()
        hidden = lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        h = hidden[:, response_start - 1 : -1]
        logits = lm.get_output_embeddings()(h).float() / temperature
        values = self.value_head(h.float()).squeeze(-1)
        return logits, values


@contextlib.contextmanager
def unwrap_for_generation(model, accelerator):
    """The bare ``PolicyWithValueHead`` for ``generate``: gradient checkpointing off (it disables the KV cache)
    and, under DeepSpeed ZeRO-3 and FSDP1, the sharded parameters gathered on every process for the duration."""
    unwrapped = accelerator.unwrap_model(model)
    policy = unwrapped.policy
    checkpointing = getattr(policy, "is_gradient_checkpointing", False)
    if checkpointing:
        policy.gradient_checkpointing_disable()
    fsdp1 = accelerator.distributed_type.name == "FSDP" and not accelerator.is_fsdp2
    try:
        if is_zero3(accelerator):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                yield unwrapped
        elif fsdp1:  # FSDP2 gathers in its forward hooks; FSDP1's root parameters stay flat shards without this
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(model, writeback=False, recurse=True):
                yield unwrapped
        else:
            yield unwrapped
    finally:
        if checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def whole_models_under_zero3(accelerator):
    """Models loaded inside are whole on every process, also under DeepSpeed ZeRO-3.

    Under ZeRO-3 accelerate registers its DeepSpeed config with transformers (whatever `zero3_init_flag` says),
    and `from_pretrained` then builds every model inside `deepspeed.zero.Init`: partitioned, with empty weights
    outside a DeepSpeed engine. The reward model and a full fine-tuning reference are used for inference only
    and never prepared, so they are loaded here with the registration lifted for the duration.
    """
    if not is_zero3(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def configure_deepspeed(config: dict, hp: "PPOHyperparameters") -> None:
    """Fill a DeepSpeed config's "auto" batch fields from the PPO flags, and refuse values that disagree.

    accelerate fills these from a prepared DataLoader, and PPO prepares none: without this, `prepare` fails
    asking for `train_micro_batch_size_per_gpu`. One engine micro-batch is one PPO minibatch; the engine steps
    after `gradient_accumulation_steps` of them and clips to `--max_grad_norm` itself.
    """
    wanted = {"train_micro_batch_size_per_gpu": (hp.mini_batch_size, "--mini_batch_size"),
              "gradient_accumulation_steps": (hp.gradient_accumulation_steps, "--gradient_accumulation_steps"),
              "gradient_clipping": (hp.max_grad_norm or 0.0, "--max_grad_norm")}
    for key, (value, flag) in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif float(config[key]) != float(value):
            raise UserError(f"the DeepSpeed config sets {key} {config[key]} but {flag} is {value}: make them agree "
                            f"(or set it to 'auto' in the DeepSpeed config)")


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` counts them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PPOHyperparameters:
    batch_size: int
    mini_batch_size: int
    gradient_accumulation_steps: int
    ppo_epochs: int
    learning_rate: float
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    max_grad_norm: float | None
    early_stopping: bool
    target_kl: float
    temperature: float
    output_min_length: int
    output_max_length: int
    generation_batch_size: int
    reward_baseline: float
    reward_normalization: str  # none | stats | running
    reward_clip: float | None
    missing_eos_penalty: float | None
    reward_batch_size: int
    seed: int


class NonFiniteError(RuntimeError):
    """A step produced a NaN or infinity; the step is skipped (see ``PPOTrainer.step``)."""


class PPOTrainer:
    """State of a PPO run and one step at a time. Only the main process saves; every process computes."""

    def __init__(self, accelerator, model: PolicyWithValueHead, tokenizer, reward_model, reward_tokenizer,
                 prompts: list[dict], hp: PPOHyperparameters, kl_ctl, reward_stats: dict | None = None,
                 ref_model: nn.Module | None = None, optimizer=None, scheduler=None):
        self.accelerator, self.hp = accelerator, hp
        self.tokenizer, self.reward_model, self.reward_tokenizer = tokenizer, reward_model, reward_tokenizer
        self.prompts, self.kl_ctl, self.reward_stats, self.ref_model = prompts, kl_ctl, reward_stats, ref_model
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            configure_deepspeed(plugin.deepspeed_config, hp)
        accelerator.gradient_accumulation_steps = hp.gradient_accumulation_steps
        # The scheduler stays outside `prepare`: accelerate would step it once per process per call.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.running = RunningMoments()
        self.step_count, self.episodes, self.skipped_steps, self.consecutive_skips = 0, 0, 0, 0
        self.data_epoch, self.data_index = 0, 0  # position in the (shuffled, global) prompt stream
        self.length_rng = random.Random(hp.seed)

    # --- prompts ---------------------------------------------------------------------------------------------

    def next_prompts(self) -> list[dict]:
        """This process's share of the next global batch, from a permutation fixed by (seed, data epoch)."""
        world, rank, bs = self.accelerator.num_processes, self.accelerator.process_index, self.hp.batch_size
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.hp.seed + self.data_epoch))
        if self.data_index + bs * world > len(order):  # start the next pass over the prompts
            self.data_epoch, self.data_index = self.data_epoch + 1, 0
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.hp.seed + self.data_epoch))
        start = self.data_index + rank * bs
        self.data_index += bs * world
        return [self.prompts[i] for i in order[start : start + bs].tolist()]

    # --- rollout ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: list[dict]) -> list[list[int]]:
        """Sample one response per prompt (left padding, KV cache, top_k=0, top_p=1), cut after the first EOS."""
        tok, hp = self.tokenizer, self.hp
        eos, pad = tok.eos_token_id, tok.pad_token_id
        responses = []
        with unwrap_for_generation(self.model, self.accelerator) as unwrapped:
            policy = unwrapped.policy
            was_training = policy.training
            policy.eval()  # no dropout while sampling
            for start in range(0, len(batch), hp.generation_batch_size):
                chunk = [row["input_ids"] for row in batch[start : start + hp.generation_batch_size]]
                width = max(map(len, chunk))
                ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=self.accelerator.device)
                mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=ids.device)
                max_new = self.length_rng.randint(hp.output_min_length, hp.output_max_length)
                out = policy.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                    temperature=hp.temperature, max_new_tokens=max_new,
                    eos_token_id=eos, pad_token_id=pad, use_cache=True,
                )
                for row in out[:, width:].tolist():
                    responses.append(row[: row.index(eos) + 1] if eos in row else row)
            policy.train(was_training)
        return responses

    def score(self, batch: list[dict], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reward-model scores, shaped scores): the RM re-tokenizes question + answer with its tokenizer."""
        from common.prompts import format_example
        from common.reward import score_texts

        hp, eos = self.hp, self.tokenizer.eos_token_id
        answers = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        texts = [format_example(row["question"], a) for row, a in zip(batch, answers)]
        raw = score_texts(self.reward_model, self.reward_tokenizer, texts, hp.reward_batch_size).to(self.accelerator.device)
        shaped = raw.clone()
        if hp.reward_normalization == "stats":
            shaped = (shaped - self.reward_stats["mean"]) / max(self.reward_stats["std"], 1e-8)
        elif hp.reward_normalization == "running":
            gathered = self.accelerator.gather(raw)
            if torch.isfinite(gathered).all():  # a NaN would poison the moments for good
                self.running.update(gathered)
            shaped = (shaped - self.running.mean) / max(self.running.std, 1e-8)
        shaped = shaped - hp.reward_baseline
        if hp.reward_clip is not None:
            shaped = shaped.clamp(-hp.reward_clip, hp.reward_clip)
        if hp.missing_eos_penalty is not None:
            no_eos = torch.tensor([not r or r[-1] != eos for r in responses], device=shaped.device)
            shaped = shaped - hp.missing_eos_penalty * no_eos.float()
        return raw, shaped

    def collate(self, batch: list[dict], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts followed by right-padded responses, as one tensor batch."""
        pad, device = self.tokenizer.pad_token_id, self.accelerator.device
        P, R = max(len(r["input_ids"]) for r in batch), max(map(len, responses))
        ids, attn, mask = [], [], []
        for row, resp in zip(batch, responses):
            q = row["input_ids"]
            ids.append([pad] * (P - len(q)) + q + resp + [pad] * (R - len(resp)))
            attn.append([0] * (P - len(q)) + [1] * (len(q) + len(resp)) + [0] * (R - len(resp)))
            mask.append([1] * len(resp) + [0] * (R - len(resp)))
        ids, attn = torch.tensor(ids, device=device), torch.tensor(attn, device=device)
        return {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids_for(attn),
                "responses": ids[:, P:], "mask": torch.tensor(mask, device=device, dtype=torch.float32), "P": P}

    def forward(self, model, b: dict, rows=slice(None)):
        logits, values = model(b["input_ids"][rows], b["attention_mask"][rows], b["position_ids"][rows], b["P"], self.hp.temperature)
        return logits, values, logprobs_from_logits(logits, b["responses"][rows])

    @torch.no_grad()
    def reference_and_values(self, b: dict) -> tuple[torch.Tensor, ...]:
        """Old log-probs, values and entropy under the policy, and reference log-probs with the adapter off."""
        model = self.accelerator.unwrap_model(self.model)
        logprobs, values, ref_logprobs, entropy = [], [], [], []
        step = self.hp.generation_batch_size
        for s in range(0, len(b["input_ids"]), step):
            rows = slice(s, s + step)
            logits, v, lp = self.forward(model, b, rows)
            entropy.append(entropy_from_logits(logits))
            logprobs.append(lp)
            values.append(v)
            if self.ref_model is not None:  # full fine-tuning: a frozen copy
                ref_logits = self.ref_model(b["input_ids"][rows], attention_mask=b["attention_mask"][rows],
                                            position_ids=b["position_ids"][rows]).logits[:, b["P"] - 1 : -1].float()
                ref_logprobs.append(logprobs_from_logits(ref_logits / self.hp.temperature, b["responses"][rows]))
            else:  # LoRA: the same network with the adapter disabled, no second copy in memory
                with model.policy.disable_adapter():
                    ref_logprobs.append(self.forward(model, b, rows)[2])
        return torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs), torch.cat(entropy)

    # --- one PPO step ----------------------------------------------------------------------------------------

    def step(self) -> tuple[dict, list[dict]]:
        """Rollout, score, rewards, advantages, ``ppo_epochs`` of updates. Returns (metrics, sample triples)."""
        acc, hp = self.accelerator, self.hp
        t0 = time.perf_counter()
        batch = self.next_prompts()
        responses = self.generate(batch)
        t1 = time.perf_counter()
        raw_scores, scores = self.score(batch, responses)
        t2 = time.perf_counter()
        b = self.collate(batch, responses)
        mask = b["mask"]
        old_logprobs, old_values, ref_logprobs, entropy = self.reference_and_values(b)
        kl_coef = self.kl_ctl.value  # the coefficient these rewards use (logged; the controller updates after)
        rewards, kl = compute_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef)
        advantages, returns = compute_gae(rewards, old_values, mask, hp.gamma, hp.lam)
        advantages = masked_whiten(advantages, mask, reduce=lambda t: acc.reduce(t, "sum"))

        finite = torch.isfinite(scores).all() & torch.isfinite(rewards).all() & torch.isfinite(old_logprobs).all()
        stats = self.update(b, old_logprobs, old_values, advantages, returns) if self._all(finite) else None
        skipped = stats is None
        t3 = time.perf_counter()

        mean_kl = self._mean(kl.sum(1).mean())
        if not skipped:
            self.kl_ctl.update(mean_kl, hp.batch_size * acc.num_processes)
            if self.scheduler is not None:
                self.scheduler.step()
        self.step_count += 1
        self.episodes += hp.batch_size * acc.num_processes
        self.skipped_steps += int(skipped)
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0

        all_raw = acc.gather(raw_scores)
        lengths = mask.sum(1)
        eos_id = self.tokenizer.eos_token_id
        ended = torch.tensor([float(bool(r) and r[-1] == eos_id) for r in responses], device=mask.device)
        var_returns = self._mean(masked_mean((returns - masked_mean(returns, mask)) ** 2, mask))
        var_resid = self._mean(masked_mean((returns - old_values - masked_mean(returns - old_values, mask)) ** 2, mask))
        metrics = {
            "step": self.step_count,
            "episodes": self.episodes,
            "objective/scores": all_raw.mean().item(),
            "objective/scores_std": all_raw.std().item() if all_raw.numel() > 1 else 0.0,
            "objective/scores_shaped": self._mean(scores.mean()),
            "objective/kl": mean_kl,
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": self._mean((scores - kl_coef * kl.sum(1)).mean()),
            "objective/entropy": self._mean(masked_mean(entropy, mask)),
            "val/explained_variance": 1.0 - var_resid / var_returns if var_returns > 0 else float("nan"),
            "val/mean": self._mean(masked_mean(old_values, mask)),
            "response/length_mean": self._mean(lengths.mean()),
            "response/eos_fraction": self._mean(ended.mean()),
            "time/generate": t1 - t0,
            "time/score": t2 - t1,
            "time/train": t3 - t2,
            "throughput/episodes_per_s": hp.batch_size * acc.num_processes / (t3 - t0),
            "skipped_steps": self.skipped_steps,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
        }
        metrics.update(stats or {k: float("nan") for k in ("policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac")})
        metrics["ppo/updates"] = (stats or {}).get("ppo/updates", 0)
        answers = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        samples = [{"step": self.step_count, "question": row["question"], "response": a, "score": s}
                   for row, a, s in zip(batch, answers, raw_scores.tolist())]
        return metrics, samples

    def update(self, b, old_logprobs, old_values, advantages, returns) -> dict | None:
        """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per ``mini * grad_accum`` rows."""
        acc, hp, mask = self.accelerator, self.hp, b["mask"]
        backward_bs = hp.mini_batch_size * hp.gradient_accumulation_steps
        acc.gradient_accumulation_steps = hp.gradient_accumulation_steps  # accelerate's state is per process, not ours
        gen = torch.Generator().manual_seed(hp.seed * 100003 + self.step_count)
        totals: dict[str, float] = {}
        n_updates, n_micro = 0, 0
        snapshot = self._snapshot()
        self.model.train()
        for _epoch in range(hp.ppo_epochs):
            b_inds = torch.randperm(hp.batch_size, generator=gen)
            stop = False
            for start in range(0, hp.batch_size, backward_bs):
                approx_kls = []
                acc.step = 0  # accelerate counts micro-batches: the last of these `gradient_accumulation_steps` syncs
                for mb_start in range(start, start + backward_bs, hp.mini_batch_size):
                    mb_inds = b_inds[mb_start : mb_start + hp.mini_batch_size].to(mask.device)
                    # DDP: gradients all-reduced on the last micro-batch only; DeepSpeed: its engine steps there
                    with acc.accumulate(self.model):
                        _, values, logprobs = self.forward(self.model, b, mb_inds)
                        loss, stats = ppo_losses(
                            logprobs, old_logprobs[mb_inds], values, old_values[mb_inds], advantages[mb_inds],
                            returns[mb_inds], mask[mb_inds], hp.cliprange, hp.cliprange_value, hp.vf_coef,
                        )
                        bad = ~torch.isfinite(loss)
                        if self._all(~bad):
                            acc.backward(loss)  # divided by gradient_accumulation_steps (by DeepSpeed's engine there)
                    if not self._all(~bad):
                        self._restore(snapshot)
                        return None
                    approx_kls.append(stats["policy/approxkl"])
                    n_micro += 1
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value.item()
                if hp.max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), hp.max_grad_norm)
                    if grad_norm is not None and not self._all(torch.isfinite(torch.as_tensor(grad_norm))):
                        self._restore(snapshot)
                        return None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                if hp.early_stopping and self._mean(torch.stack(approx_kls).mean()) > 1.5 * hp.target_kl:
                    stop = True  # every process sees the same averaged value, so all stop together
                    break
            if stop:
                break
        out = {k: self._mean(torch.tensor(v / max(n_micro, 1), device=mask.device)) for k, v in totals.items()}
        out["ppo/updates"] = n_updates
        return out

    # --- helpers ---------------------------------------------------------------------------------------------

    def _snapshot(self) -> dict | None:
        """Trainable weights and optimizer state before an update, so a non-finite loss in a later minibatch
        can undo the step's earlier optimizer steps too. Taken when the trainable weights are small (LoRA and
        value head); with full fine-tuning a copy would double the memory, and only the failing optimizer step
        is skipped (docs/ppo.md). Not under DeepSpeed or FSDP either: their master weights and optimizer state
        live in sharded buffers that a copy of the module's parameters does not restore."""
        model = self.accelerator.unwrap_model(self.model)
        params = [p for p in model.parameters() if p.requires_grad]
        if self._sharded() or sum(p.numel() for p in params) > 0.2 * sum(p.numel() for p in model.parameters()):
            return None
        return {"params": [p.detach().clone() for p in params], "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def _restore(self, snapshot: dict | None) -> None:
        for p in self.model.parameters():  # not optimizer.zero_grad: accelerate skips it mid-accumulation
            p.grad = None
        if snapshot is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for p, saved in zip([p for p in model.parameters() if p.requires_grad], snapshot["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])

    def _mean(self, x) -> float:
        """Mean across processes of a scalar tensor."""
        x = torch.as_tensor(x, dtype=torch.float32, device=self.accelerator.device).reshape(1)
        return self.accelerator.reduce(x, "mean").item() if self.accelerator.num_processes > 1 else x.item()

    def _all(self, flag) -> bool:
        """True only if ``flag`` holds on every process (so all processes take the same branch)."""
        x = torch.as_tensor(flag, dtype=torch.float32, device=self.accelerator.device).reshape(1)
        if self.accelerator.num_processes > 1:
            x = self.accelerator.reduce(x, "sum") / self.accelerator.num_processes
        return bool(x.item() == 1.0)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "global_step": self.step_count, "episodes": self.episodes, "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips, "num_processes": self.accelerator.num_processes,
            "kl_coef": self.kl_ctl.value, "running": [self.running.mean, self.running.var, self.running.count],
            "data_epoch": self.data_epoch, "data_index": self.data_index,
            "length_rng": _rng_to_json(self.length_rng.getstate()),
        }

    def save_checkpoint(self, folder: str, extra_files: dict[str, str] | None = None) -> None:
        """Everything needed to continue exactly, written to ``folder.tmp`` and renamed (main process writes)."""
        acc = self.accelerator
        rng = {"torch": torch.get_rng_state(), "python": _rng_to_json(random.getstate())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        tmp = folder + ".tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        torch.save(rng, os.path.join(tmp, f"rng_state_{acc.process_index}.pth"))  # every process its own
        self.save_model(tmp)
        if self._sharded():  # optimizer state split across processes: each writes its part (accelerate's format)
            acc.save_state(os.path.join(tmp, "sharded_state"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if not self._sharded():
                torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            if self.scheduler is not None:
                torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            for name, text in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:  # written last
                json.dump(self.state(), f, indent=1)
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        acc.wait_for_everyone()

    def save_model(self, folder: str) -> None:
        """The policy (adapter, or full model) and the value head, in safetensors. Every process calls it: under
        ZeRO-3 and FSDP the full weights are gathered from all of them; the main process writes."""
        from safetensors.torch import save_file

        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # DDP / one process: the module's own state_dict, no copy
        if not acc.is_main_process:
            return
        os.makedirs(folder, exist_ok=True)
        part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        acc.unwrap_model(self.model).policy.save_pretrained(folder, state_dict=part("policy."))
        save_file({k: v.detach().cpu().contiguous() for k, v in part("value_head.").items()},
                  os.path.join(folder, "value_head.safetensors"))

    def _sharded(self) -> bool:
        """DeepSpeed or FSDP: weights and optimizer state are split across processes."""
        return self.accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")

    def load_checkpoint(self, folder: str) -> None:
        from safetensors.torch import load_file

        if self._sharded():  # weights and optimizer state, each process its shard
            self.accelerator.load_state(os.path.join(folder, "sharded_state"))
        else:
            model = self.accelerator.unwrap_model(self.model)
            model.value_head.load_state_dict(load_file(os.path.join(folder, "value_head.safetensors")))
            if hasattr(model.policy, "load_adapter") and os.path.isfile(os.path.join(folder, "adapter_config.json")):
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(model.policy, load_file(os.path.join(folder, "adapter_model.safetensors")))
            else:
                model.policy.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=False)
            self.optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
        if self.scheduler is not None and os.path.isfile(os.path.join(folder, "scheduler.pt")):
            self.scheduler.load_state_dict(torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True))
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            s = json.load(f)
        self.step_count, self.episodes, self.skipped_steps = s["global_step"], s["episodes"], s["skipped_steps"]
        self.consecutive_skips = s.get("consecutive_skips", 0)
        self.kl_ctl.value = s["kl_coef"]
        self.running.mean, self.running.var, self.running.count = s["running"]
        self.data_epoch, self.data_index = s["data_epoch"], s["data_index"]
        self.length_rng.setstate(_rng_from_json(s["length_rng"]))
        rng_file = os.path.join(folder, f"rng_state_{self.accelerator.process_index}.pth")
        if not os.path.isfile(rng_file):
            raise UserError(f"{folder} has no {os.path.basename(rng_file)}: it was written by a run with "
                            f"{s.get('num_processes')} processes; resume with the same number")
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_rng_from_json(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
