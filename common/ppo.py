"""PPO for RLHF on `accelerate` (DESIGN.md, section PPO; each detail and its source: docs/ppo.md).

``PPOConfig`` holds every setting of the algorithm (parsed from the command line by training_rl.py).
``PolicyWithValueHead`` is the policy with a scalar value head. ``PPOTrainer`` holds the state of a run and does
one PPO step at a time: rollout -> score -> old log-probs, values and reference log-probs -> rewards ->
advantages -> ``ppo_epochs`` of minibatch updates. The math is in common/ppo_math.py, the device plumbing
(DeepSpeed, FSDP, gradient synchronisation) in common/ppo_distributed.py.

Shapes: ``B`` responses per process, ``P`` padded prompt tokens, ``R`` response tokens (padded), ``V``
vocabulary, ``H`` hidden size. Per-token tensors are ``[B, R]``, aligned with the response tokens ``a_1..a_R``;
``mask`` is 1 up to and including the first EOS and 0 after it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ppo_distributed as dist
from common.checkpoints import write_origin
from common.cli import UserError
from common.generation import eos_token_ids, sample_responses
from common.outputs import check_processes, replace_folder, writing
from common.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    compute_rewards,
    critic_free_losses,
    entropy_from_logits,
    explained_variance,
    group_advantages,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_losses,
    rloo_advantages,
    token_weights,
)

# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """Every setting of the PPO algorithm. Defaults are StackLLaMA's (STACKLLAMA.md)."""

    steps: int = field(
        default=20000, metadata={"help": "Episodes (responses) per process: ceil(steps / batch_size) PPO steps."})
    batch_size: int = field(default=32, metadata={"help": "Responses per PPO step, per process."})
    mini_batch_size: int = field(default=1, metadata={"help": "Responses per forward/backward in the update."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Minibatches per optimizer step."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch."})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "Optimizer learning rate."})
    adafactor: bool = field(default=False, metadata={"help": "Use Adafactor instead of AdamW."})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "transformers scheduler name (over PPO steps)."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    early_stopping: bool = field(
        default=False, metadata={"help": "Stop a step's updates once approx-KL > 1.5 * target_kl."})
    target_kl: float = field(default=0.1, metadata={"help": "Approx-KL threshold for --early_stopping."})
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial KL penalty coefficient."})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "Adapt the KL coefficient towards --target."})
    target: float = field(default=6.0, metadata={"help": "Target KL (nats per response) of the adaptive controller."})
    horizon: int = field(default=10000, metadata={"help": "Horizon (episodes) of the adaptive controller."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float | None = field(
        default=0.2, metadata={"help": "Value clip, in units of the shaped score (None: no value clipping)."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    output_min_length: int = field(default=32, metadata={"help": "Lower bound of the sampled max_new_tokens."})
    output_max_length: int = field(default=128, metadata={"help": "Upper bound of the sampled max_new_tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (top_k=0, top_p=1)."})
    batched_gen: bool = field(
        default=True, metadata={"help": "Generate --generation_batch_size prompts at once (false: one by one)."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generate() call (default: --batch_size)."})
    reward_baseline: float = field(default=0.0, metadata={"help": "Subtracted from every score."})
    reward_normalization: str = field(
        default="running", metadata={"help": "Scale of the scores PPO optimises: running (mean 0, std 1 under running "
                                             "statistics of the scores seen so far), stats (the reward model's "
                                             "reward_stats.json) or none (raw).",
                                     "choices": ["none", "stats", "running"]})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip shaped scores to +-this (None: no clip)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response that never ended."})
    reward_batch_size: int = field(default=16, metadata={"help": "Texts per reward-model forward."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, shuffling and initialisation."})
    algorithm: str = field(
        default="ppo", metadata={"help": "ppo (a value head and GAE), rloo (k samples per prompt, leave-one-out "
                                         "baseline, KL in the reward) or grpo (k samples per prompt, group-normalised "
                                         "advantages, KL in the loss); docs/critic_free.md.",
                                 "choices": ["ppo", "rloo", "grpo"]})
    num_generations: int | None = field(
        default=None, metadata={"help": "rloo/grpo: samples per prompt, k (default 4); --batch_size responses are "
                                        "batch_size / k prompts x k samples."})
    scale_rewards: str | None = field(
        default=None, metadata={"help": "grpo: divide the group-centred scores by the group's std (group, the "
                                        "default), the process's batch's (batch), or not at all (none: Dr. GRPO)."})
    loss_type: str | None = field(
        default=None, metadata={"help": "rloo/grpo: how token losses add up: token (each token alike over the "
                                        "optimizer step, as PPO; the default), grpo (mean per answer, then over "
                                        "answers) or dr_grpo (sum over tokens / (answers x --output_max_length))."})

    @property
    def gen_batch_size(self) -> int:
        return (self.generation_batch_size or self.batch_size) if self.batched_gen else 1

    @property
    def group_size(self) -> int:
        """Samples per prompt: 1 for PPO, ``--num_generations`` (default 4) for RLOO and GRPO."""
        return 1 if self.algorithm == "ppo" else (self.num_generations or 4)

    @property
    def prompts_per_step(self) -> int:
        """Prompts per step and process: each is answered ``group_size`` times."""
        return self.batch_size // self.group_size

    def problems(self) -> list[str]:
        """Every argument problem, each naming its flag (training_rl.check_args raises them together)."""
        out = []
        for name in ("steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "target",
                     "horizon", "output_min_length", "output_max_length", "reward_batch_size", "generation_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                out.append(f"--{name} must be > 0, got {value}")
        for name in ("learning_rate", "temperature", "cliprange"):
            if getattr(self, name) <= 0:
                out.append(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.cliprange_value is not None and self.cliprange_value <= 0:
            out.append(f"--cliprange_value must be > 0 (or None: no clipping), got {self.cliprange_value}")
        if self.mini_batch_size > 0 and self.gradient_accumulation_steps > 0 and \
                self.batch_size % (self.mini_batch_size * self.gradient_accumulation_steps):
            out.append(f"--batch_size {self.batch_size} must be divisible by --mini_batch_size {self.mini_batch_size} "
                       f"x --gradient_accumulation_steps {self.gradient_accumulation_steps}")
        if self.algorithm == "ppo":
            for name in ("num_generations", "scale_rewards", "loss_type"):
                if getattr(self, name) is not None:
                    out.append(f"--{name} is a setting of --algorithm rloo or grpo, not of ppo")
        else:
            k = self.group_size
            if k < 2:
                out.append(f"--num_generations must be >= 2 (the baseline comes from the other samples), got {k}")
            elif self.batch_size > 0 and self.batch_size % k:
                out.append(f"--batch_size {self.batch_size} must be divisible by --num_generations {k}")
            if self.scale_rewards is not None and self.algorithm != "grpo":
                out.append("--scale_rewards is a setting of --algorithm grpo")
            if self.scale_rewards not in (None, "group", "batch", "none"):
                out.append(f"--scale_rewards must be group, batch or none, got {self.scale_rewards}")
            if self.loss_type not in (None, "token", "grpo", "dr_grpo"):
                out.append(f"--loss_type must be token, grpo or dr_grpo, got {self.loss_type}")
        if self.output_min_length > self.output_max_length:
            out.append(f"--output_min_length {self.output_min_length} > --output_max_length {self.output_max_length}")
        return out


# ----------------------------------------------------------------------------------------------------------------
# Policy with value head
# ----------------------------------------------------------------------------------------------------------------


class PolicyWithValueHead(nn.Module):
    """The policy (a causal LM, usually with a LoRA adapter) and a scalar value head on its last hidden state.

    ``forward`` runs the model's own forward (so logit soft-capping or scaling of its family applies) with
    ``logits_to_keep`` covering the response, and reads the decoder's output (the input of the LM head) for the
    value head, captured by a forward hook: one pass gives ``[B, R + 1, V]`` logits (positions ``P - 1 .. T - 1``;
    the last predicts past the end and is unused) and ``[B, R]`` values (positions ``P - 1 .. T - 2``).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        width = self.lm().get_output_embeddings().in_features  # the LM head's input (OPT may project to it)
        self.value_head = nn.Linear(width, 1)
        nn.init.zeros_(self.value_head.weight)  # as lm-human-preferences: V = 0 until the value loss teaches it
        nn.init.zeros_(self.value_head.bias)

    def lm(self) -> nn.Module:
        """The causal LM under the (optional) peft wrapper; LoRA layers inside it stay active."""
        return self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy

    def forward(self, input_ids, attention_mask, position_ids, response_start: int):
        lm = self.lm()
        captured = []
        hook = lm.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
        try:
            logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                        logits_to_keep=input_ids.shape[1] - response_start + 1).logits
        finally:
            hook.remove()
        h = captured[-1][:, response_start - 1 : -1]
        values = self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[B, R]`` log-probs of the response tokens from the ``[B, R + 1, V]`` logits of ``PolicyWithValueHead``.

    The logits stay whole (a slice would be copied when flattened); the position past the end gets a dummy token
    whose log-prob is dropped (its gradient is zero)."""
    tokens = torch.cat([responses, responses[:, :1]], 1)
    return logprobs_from_logits(logits, tokens, temperature)[:, :-1]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` counts them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------------
# Small stateful parts of a run (each saved in a checkpoint's run_state.json, PPOTrainer.save_checkpoint)
# ----------------------------------------------------------------------------------------------------------------


class PromptStream:
    """The order prompts are used in: a permutation fixed by (seed, pass over the data); each PPO step takes the
    next ``batch_size x num_processes`` of them and process ``r`` takes slice ``r``. A remainder smaller than a
    global batch is skipped and the next pass is reshuffled."""

    def __init__(self, n_prompts: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_prompts, batch_size, seed
        self.epoch, self.index = 0, 0

    def next_indices(self, world: int, rank: int) -> list[int]:
        if self.index + self.batch_size * world > self.n:
            self.epoch, self.index = self.epoch + 1, 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start = self.index + rank * self.batch_size
        self.index += self.batch_size * world
        return order[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class LengthSampler:
    """StackLLaMA's response-length sampler: ``max_new_tokens`` uniform in ``[low, high]``, both ends included."""

    def __init__(self, low: int, high: int, seed: int):
        self.low, self.high, self.rng = low, high, random.Random(seed)

    def __call__(self) -> int:
        return self.rng.randint(self.low, self.high)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


@dataclass
class Progress:
    """Counters of a run."""

    step: int = 0
    episodes: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for key in vars(self):
            setattr(self, key, int(state[key]))


class NonFiniteError(RuntimeError):
    """A step produced a NaN or infinity; the step is skipped (see ``PPOTrainer.step``)."""


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


class PPOTrainer:
    """State of a PPO run and one step at a time. Every process computes; only the main process writes files."""

    def __init__(self, accelerator, model: PolicyWithValueHead, tokenizer, reward_model, reward_tokenizer,
                 prompts: list[dict], config: PPOConfig, reward_stats: dict | None = None,
                 ref_model: nn.Module | None = None, optimizer=None, scheduler=None):
        dist.check_supported(accelerator)
        self.accelerator, self.config = accelerator, config
        self.tokenizer, self.reward_model, self.reward_tokenizer = tokenizer, reward_model, reward_tokenizer
        self.prompts, self.reward_stats, self.ref_model = prompts, reward_stats, ref_model
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            dist.configure_deepspeed(plugin.deepspeed_config, config)
        self.eos_ids = eos_token_ids(tokenizer, model.lm())
        if config.algorithm != "ppo":  # no critic: the value head stays at zero and out of DDP's gradient reduction
            model.value_head.requires_grad_(False)
        # The scheduler stays outside `prepare`: accelerate would step it once per process per call.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon) if config.adap_kl_ctrl
                       else FixedKLController(config.init_kl_coef))
        self.running = RunningMoments()
        self.stream = PromptStream(len(prompts), config.prompts_per_step, config.seed)
        self.length_sampler = LengthSampler(config.output_min_length, config.output_max_length, config.seed)
        self.progress = Progress()
        self._hooks = [accelerator.register_save_state_pre_hook(self._save_weights_hook),
                       accelerator.register_load_state_pre_hook(self._load_weights_hook)]

    # --- rollout ---------------------------------------------------------------------------------------------

    def next_prompts(self) -> list[dict]:
        """This process's share of the next global batch of prompts; with RLOO and GRPO each prompt ``group_size``
        times in a row (a group: its samples are each other's baseline, on the same process)."""
        acc, k = self.accelerator, self.config.group_size
        return [self.prompts[i] for i in self.stream.next_indices(acc.num_processes, acc.process_index)
                for _ in range(k)]

    @torch.no_grad()
    def generate(self, batch: list[dict]) -> list[list[int]]:
        """One sampled response per prompt (``common/generation.py``: only our sampling settings apply), cut after
        the first EOS; in chunks of ``gen_batch_size`` prompts, each with its own sampled maximum length."""
        hp, responses = self.config, []
        with dist.unwrap_for_generation(self.model, self.accelerator) as unwrapped:
            lm = unwrapped.lm()
            was_training = lm.training
            lm.eval()
            for start in range(0, len(batch), hp.gen_batch_size):
                chunk = [row["input_ids"] for row in batch[start : start + hp.gen_batch_size]]
                responses += sample_responses(lm, chunk, self.length_sampler(), hp.temperature, self.eos_ids,
                                              self.tokenizer.pad_token_id)
            lm.train(was_training)
        return responses

    def ended(self, responses: list[list[int]]) -> torch.Tensor:
        ended = [float(bool(r) and r[-1] in self.eos_ids) for r in responses]
        return torch.tensor(ended, device=self.accelerator.device)

    def score(self, batch: list[dict], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reward-model scores, shaped scores): the RM re-tokenizes question + answer with its tokenizer."""
        from common.prompts import render_answer
        from common.reward import score_texts

        hp = self.config
        answers = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        texts = [render_answer(self.reward_tokenizer, row["prompt"], a) for row, a in zip(batch, answers)]
        raw = score_texts(self.reward_model, self.reward_tokenizer, texts, hp.reward_batch_size)
        raw = raw.to(self.accelerator.device)
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
            shaped = shaped - hp.missing_eos_penalty * (1.0 - self.ended(responses))
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

    def forward(self, model, b: dict, rows, ref: bool = False):
        """Logits' log-probs and values of ``rows`` of the batch, trimmed to the columns those rows use (padding
        columns that every row of them has on the left of the prompts or right of the responses are left out:
        they change nothing but the work). Returns ``[n, R']`` values and log-probs and the ``[n, R' + 1, V]``
        logits, ``R'`` = the longest response among ``rows``. ``ref``: with full fine-tuning, the frozen copy."""
        attn = b["attention_mask"][rows]
        P = b["P"]
        left = int(attn[:, :P].any(0).float().argmax())  # first column that holds a prompt token of some row
        width = int(b["mask"][rows].sum(1).max())
        cols = slice(left, P + width)
        args = (b["input_ids"][rows, cols], attn[:, cols], b["position_ids"][rows, cols])
        if ref and self.ref_model is not None:
            logits = self.ref_model(input_ids=args[0], attention_mask=args[1], position_ids=args[2], use_cache=False,
                                    logits_to_keep=width + 1).logits
            values = None
        else:
            logits, values = model(*args, P - left)
        return values, response_logprobs(logits, b["responses"][rows, :width], self.config.temperature), logits

    @torch.no_grad()
    def reference_and_values(self, b: dict) -> tuple[torch.Tensor, ...]:
        """Old log-probs, values and entropy under the policy, and reference log-probs (the adapter disabled, or
        the frozen copy with full fine-tuning), in chunks of ``gen_batch_size`` rows, each ``[B, R]``."""
        model = self.accelerator.unwrap_model(self.model)
        R = b["mask"].shape[1]
        pad = lambda x: F.pad(x, (0, R - x.shape[1]))  # noqa: E731  (back to the batch's width)
        out = {"logprobs": [], "values": [], "ref_logprobs": [], "entropy": []}
        step = self.config.gen_batch_size
        for s in range(0, len(b["input_ids"]), step):
            rows = slice(s, s + step)
            values, logprobs, logits = self.forward(model, b, rows)
            out["entropy"].append(pad(entropy_from_logits(logits, self.config.temperature)[:, :-1]))
            out["logprobs"].append(pad(logprobs))
            out["values"].append(pad(values))
            del logits
            if self.ref_model is not None:
                ref_logprobs = self.forward(model, b, rows, ref=True)[1]
            else:  # LoRA: the same network with the adapter disabled, no second copy in memory
                with model.policy.disable_adapter():
                    ref_logprobs = self.forward(model, b, rows)[1]
            out["ref_logprobs"].append(pad(ref_logprobs))
        mask = b["mask"]
        return tuple(torch.cat(out[k]) * mask for k in ("logprobs", "values", "ref_logprobs", "entropy"))

    @torch.no_grad()
    def evaluate(self, rows: list[dict], seed: int) -> dict:
        """Answers of the current policy to held-out ``rows`` (each with ``input_ids``, ``question`` and, for the
        sample data, ``answer_key``), and their mean reward-model score, gold score (``common/gold.py``; None when a
        row has no answer key) and length, as ``eval/*`` metrics. Sampled as in training, at the longest length,
        from a fixed seed, with the training RNG streams left as they were (so a resumed run continues exactly);
        every process answers its share of the rows."""
        from common.gold import gold_score
        from common.prompts import render_answer
        from common.reward import score_texts

        acc, hp = self.accelerator, self.config
        mine = rows[acc.process_index :: acc.num_processes]
        responses = []
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), dist.unwrap_for_generation(self.model, acc) as unwrapped:
            torch.manual_seed(seed)
            lm = unwrapped.lm()
            was_training = lm.training
            lm.eval()
            for start in range(0, len(mine), hp.gen_batch_size):
                chunk = [row["input_ids"] for row in mine[start : start + hp.gen_batch_size]]
                responses += sample_responses(lm, chunk, hp.output_max_length, hp.temperature, self.eos_ids,
                                              self.tokenizer.pad_token_id)
            lm.train(was_training)
        answers = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        texts = [render_answer(self.reward_tokenizer, row["prompt"], a) for row, a in zip(mine, answers)]
        rm = score_texts(self.reward_model, self.reward_tokenizer, texts, hp.reward_batch_size) if texts else None
        keyed = [(row, a) for row, a in zip(mine, answers) if row.get("answer_key")]
        gold = [gold_score(row["question"], a, row["answer_key"]) for row, a in keyed]
        sums = torch.tensor([float(rm.sum()) if rm is not None else 0.0, float(sum(gold)), float(len(gold)),
                             float(sum(map(len, responses))), float(len(responses))], device=acc.device)
        rm_sum, gold_sum, n_gold, length_sum, n = self._sum(sums).tolist()
        return {"eval/rm_score": rm_sum / max(n, 1),
                "eval/gold": gold_sum / n_gold if n_gold == n and n > 0 else None,
                "eval/length": length_sum / max(n, 1), "eval/prompts": int(n)}

    # --- one PPO step ----------------------------------------------------------------------------------------

    def step(self) -> tuple[dict, list[dict]]:
        """Rollout, score, rewards, advantages, ``ppo_epochs`` of updates. Returns (metrics, sample triples)."""
        acc, hp = self.accelerator, self.config
        t0 = time.perf_counter()
        batch = self.next_prompts()
        responses = self.generate(batch)
        t1 = time.perf_counter()
        raw_scores, scores = self.score(batch, responses)
        t2 = time.perf_counter()
        b = self.collate(batch, responses)
        mask = b["mask"]
        old_logprobs, old_values, ref_logprobs, entropy = self.reference_and_values(b)
        kl_coef = self.kl_ctl.value  # the coefficient these rewards use (the controller updates after the step)
        rewards, kl = compute_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef)
        returns = None
        if hp.algorithm == "ppo":
            advantages, returns = compute_gae(rewards, old_values, mask, hp.gamma, hp.lam)
            advantages = masked_whiten(advantages, mask, reduce=self._sum)
        elif hp.algorithm == "rloo":  # one reward per answer, its KL to the reference included (Ahmadian et al. eq. 3)
            advantages = rloo_advantages(scores - kl_coef * kl.sum(1), hp.group_size)
        else:  # grpo: the KL is in the loss instead
            advantages = group_advantages(scores, hp.group_size, hp.scale_rewards or "group")

        finite = torch.isfinite(scores).all() & torch.isfinite(rewards).all() & torch.isfinite(old_logprobs).all()
        stats = (self.update(b, old_logprobs, old_values, advantages, returns, ref_logprobs, kl_coef)
                 if self._all(finite) else None)
        skipped = stats is None
        t3 = time.perf_counter()

        mean_kl = self._mean(kl.sum(1).mean())
        p = self.progress
        if not skipped:
            self.kl_ctl.update(mean_kl, hp.batch_size * acc.num_processes)
            if self.scheduler is not None:
                self.scheduler.step()
        p.step += 1
        p.episodes += hp.batch_size * acc.num_processes
        p.skipped_steps += int(skipped)
        p.consecutive_skips = p.consecutive_skips + 1 if skipped else 0

        all_raw = acc.gather(raw_scores)
        metrics = {
            "step": p.step,
            "episodes": p.episodes,
            "objective/scores": all_raw.mean().item(),
            "objective/scores_std": all_raw.std().item() if all_raw.numel() > 1 else 0.0,
            "objective/scores_shaped": self._mean(scores.mean()),
            "objective/kl": mean_kl,
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": self._mean((scores - kl_coef * kl.sum(1)).mean()),
            "objective/entropy": self._mean(masked_mean(entropy, mask)),
            "response/length_mean": self._mean(mask.sum(1).mean()),
            "response/eos_fraction": self._mean(self.ended(responses).mean()),
            "time/generate": t1 - t0,
            "time/score": t2 - t1,
            "time/train": t3 - t2,
            "throughput/episodes_per_s": hp.batch_size * acc.num_processes / (t3 - t0),
            "skipped_steps": p.skipped_steps,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
        }
        if hp.algorithm == "ppo":  # the critic's numbers; RLOO and GRPO have none
            metrics["val/explained_variance"] = explained_variance(old_values, returns, mask, reduce=self._sum)
            metrics["val/mean"] = self._mean(masked_mean(old_values, mask))
        for key in self.stat_keys():
            metrics[key] = stats[key] if stats else float("nan")
        metrics["ppo/updates"] = stats["ppo/updates"] if stats else 0
        answers = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        samples = [{"step": p.step, "question": row["question"], "response": a, "score": s}
                   for row, a, s in zip(batch, answers, raw_scores.tolist())]
        return metrics, samples

    def stat_keys(self) -> tuple[str, ...]:
        """The update's statistics: PPO's include the critic's; GRPO's the KL term of its loss."""
        if self.config.algorithm == "ppo":
            return STAT_KEYS
        return CRITIC_FREE_STAT_KEYS + (("loss/kl",) if self.config.algorithm == "grpo" else ())

    def update(self, b, old_logprobs, old_values, advantages, returns, ref_logprobs=None, kl_coef=0.0) -> dict | None:
        """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per ``mini x grad_accum`` rows.

        Each optimizer step's loss is a sum over its response tokens divided by their number across all its
        micro-batches and processes (``ppo_losses(n_tokens=...)``; RLOO and GRPO: ``token_weights`` of the whole
        step), so 2 processes x accumulation take the step one process would take with the whole batch. PPO's
        ``advantages`` are per token, RLOO's and GRPO's per answer (``[B]``; GRPO adds ``kl_coef`` times the KL to
        ``ref_logprobs`` to its loss). Returns the token-weighted mean statistics over the optimizer steps taken,
        or None if a non-finite loss or gradient made the step skip."""
        acc, hp, mask = self.accelerator, self.config, b["mask"]
        keys = self.stat_keys()
        rows_per_step = hp.mini_batch_size * hp.gradient_accumulation_steps
        scale = dist.loss_scale(acc, hp.gradient_accumulation_steps)
        gen = torch.Generator().manual_seed(hp.seed * 100003 + self.progress.step)
        sums: dict[str, float] = {}
        n_updates = 0
        snapshot = self._snapshot()
        self.model.train()
        for _epoch in range(hp.ppo_epochs):
            b_inds = torch.randperm(hp.batch_size, generator=gen)
            stop = False
            for start in range(0, hp.batch_size, rows_per_step):
                step_inds = b_inds[start : start + rows_per_step].to(mask.device)
                n_tokens = self._sum(mask[step_inds].sum())  # the whole optimizer step's response tokens
                n_seqs = len(step_inds) * acc.num_processes  # and its answers (every process has as many rows)
                step_stats = torch.zeros(len(keys), device=mask.device)
                for k in range(hp.gradient_accumulation_steps):
                    mb_inds = step_inds[k * hp.mini_batch_size : (k + 1) * hp.mini_batch_size]
                    with dist.micro_batch(acc, self.model, last=k == hp.gradient_accumulation_steps - 1):
                        values, logprobs, _ = self.forward(self.model, b, mb_inds)
                        R = logprobs.shape[1]
                        if hp.algorithm == "ppo":
                            loss, stats = ppo_losses(
                                logprobs, old_logprobs[mb_inds, :R], values, old_values[mb_inds, :R],
                                advantages[mb_inds, :R], returns[mb_inds, :R], mask[mb_inds, :R],
                                hp.cliprange, hp.cliprange_value, hp.vf_coef, n_tokens=n_tokens,
                            )
                        else:
                            mb_mask = mask[mb_inds, :R]
                            weights = token_weights(mb_mask, hp.loss_type or "token", n_tokens, n_seqs,
                                                    hp.output_max_length)
                            loss, stats = critic_free_losses(
                                logprobs, old_logprobs[mb_inds, :R], ref_logprobs[mb_inds, :R], advantages[mb_inds],
                                mb_mask, weights, n_tokens, hp.cliprange, kl_coef if hp.algorithm == "grpo" else 0.0,
                            )
                        finite = self._all(torch.isfinite(loss))
                        if finite:
                            acc.backward(loss * scale)
                    if not finite:
                        self._restore(snapshot)
                        return None
                    step_stats += torch.stack([stats[key] for key in keys])
                step_stats = self._sum(step_stats)  # token sums / the step's tokens: adds up across processes
                if hp.max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), hp.max_grad_norm)
                    if grad_norm is not None and not self._all(torch.isfinite(torch.as_tensor(grad_norm))):
                        self._restore(snapshot)
                        return None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                for key, value in zip(keys, step_stats.tolist()):
                    sums[key] = sums.get(key, 0.0) + value
                if hp.early_stopping and float(step_stats[keys.index("policy/approxkl")]) > 1.5 * hp.target_kl:
                    stop = True  # every process sees the same global value, so all stop together
                    break
            if stop:
                break
        out = {k: v / max(n_updates, 1) for k, v in sums.items()}
        out["ppo/updates"] = n_updates
        return out

    # --- helpers ---------------------------------------------------------------------------------------------

    def _snapshot(self) -> dict | None:
        """Trainable weights and optimizer state before an update, so a non-finite loss in a later minibatch can
        undo the step's earlier optimizer steps too. Taken when the trainable weights are small (LoRA and value
        head); with full fine-tuning a copy would double the memory, and only the failing optimizer step is
        skipped (docs/ppo.md). Not under DeepSpeed either: its master weights and optimizer state live in
        sharded buffers that a copy of the module's parameters does not restore."""
        model = self.accelerator.unwrap_model(self.model)
        params = [p for p in model.parameters() if p.requires_grad]
        large = sum(p.numel() for p in params) > 0.2 * sum(p.numel() for p in model.parameters())
        if dist.is_sharded(self.accelerator) or large:
            return None
        return {"params": [p.detach().clone() for p in params], "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def _restore(self, snapshot: dict | None) -> None:
        for p in self.model.parameters():
            p.grad = None
        if snapshot is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for p, saved in zip([p for p in model.parameters() if p.requires_grad], snapshot["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum across processes."""
        return self.accelerator.reduce(x, "sum") if self.accelerator.num_processes > 1 else x

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

    def _run_state(self) -> dict:
        """The run's own small states, by name (each a plain ``state_dict``), saved as JSON in ``STATE_FILE``."""
        parts = {"progress": self.progress, "kl_controller": self.kl_ctl, "running_moments": self.running,
                 "prompt_stream": self.stream, "length_sampler": self.length_sampler, "scheduler": self.scheduler}
        return {name: obj for name, obj in parts.items() if obj is not None}

    def save_checkpoint(self, folder: str, extra_files: dict[str, str] | None = None) -> None:
        """Everything needed to continue exactly: through ``accelerator.save_state`` the policy and value head
        (``_save_weights_hook``), optimizer and per-process RNG states (which accelerate loads with
        ``weights_only=True``); the run's own state (counters, KL controller, running moments, prompt position,
        length sampler, scheduler) as JSON in ``STATE_FILE``; ``trainer_state.json`` last. Written to
        ``folder.tmp``, then swapped in (``replace_folder``)."""
        acc = self.accelerator
        tmp = folder + ".tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        with writing(f"checkpoint {folder}"):
            acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            extra_files = {**(extra_files or {}), STATE_FILE: json.dumps(
                {name: obj.state_dict() for name, obj in self._run_state().items()}, indent=1)}
            for name, text in extra_files.items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            state = {"global_step": self.progress.step, "episodes": self.progress.episodes,
                     "num_processes": acc.num_processes, "kl_coef": self.kl_ctl.value,
                     "algorithm": self.config.algorithm, "group_size": self.config.group_size,
                     "distributed_type": dist.distributed_type(acc)}
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
            write_origin(tmp, getattr(self, "origin", None) or {})  # last: the model trained, every file's size
            replace_folder(tmp, folder)
        acc.wait_for_everyone()

    def load_checkpoint(self, folder: str) -> None:
        """Restore everything ``save_checkpoint`` wrote; refuse a checkpoint of another number of processes."""
        acc = self.accelerator
        if not os.path.isfile(os.path.join(folder, "random_states_0.pkl")):
            raise UserError(f"{folder} is not a checkpoint of this version of training_rl.py (no random_states_0.pkl); "
                            "start a new run, or resume with the version that wrote it")
        check_processes(folder, acc.num_processes)  # the prompt stream, RNG states and global batch depend on it
        check_algorithm(folder, self.config)
        state_path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(state_path):  # an earlier version pickled these states; they are never unpickled
            raise UserError(f"{folder} has no {STATE_FILE} (written by an earlier version of training_rl.py, which "
                            "pickled the run's state): start a new run, or resume with the version that wrote it")
        acc.load_state(folder)
        with open(state_path, encoding="utf-8") as f:
            saved = json.load(f)
        for name, obj in self._run_state().items():
            obj.load_state_dict(saved[name])

    def _save_weights_hook(self, models, weights, output_dir) -> None:
        """accelerate's save-state pre-hook (every process): the policy is written as an adapter (or full model)
        with its value head by ``save_model`` instead of accelerate's whole-model file, so a LoRA checkpoint holds
        the adapter only and is itself an adapter folder. Under DeepSpeed the engine has saved its shards; the
        gathered adapter is written next to them."""
        if weights:
            weights.pop()
        self.save_model(output_dir)

    def _load_weights_hook(self, models, input_dir) -> None:
        """accelerate's load-state pre-hook: load what ``_save_weights_hook`` wrote, strictly (a missing or
        unexpected key is an error). Under DeepSpeed ``models`` is empty: the engine loaded its shards."""
        if not models:
            return
        models.pop()
        load_policy_weights(self.accelerator.unwrap_model(self.model), input_dir)

    def save_model(self, folder: str) -> None:
        """The policy (adapter, or full model) and the value head, in safetensors. Every process calls it: under
        ZeRO-3 the full weights are gathered from all of them; the main process writes."""
        from safetensors.torch import save_file

        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # DDP / one process: the module's own state_dict, no copy
        if not acc.is_main_process:
            return
        os.makedirs(folder, exist_ok=True)
        part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        acc.unwrap_model(self.model).policy.save_pretrained(folder, state_dict=part("policy."))
        save_file({k: v.detach().cpu().contiguous() for k, v in part("value_head.").items()},
                  os.path.join(folder, VALUE_HEAD_FILE))


def check_algorithm(folder: str, config: PPOConfig) -> None:
    """Refuse a checkpoint written by another ``--algorithm`` or number of samples per prompt (its prompt stream,
    batch layout and weights mean something else); one before PPO's ``algorithm`` field counts as PPO's."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return  # not a complete checkpoint: what loads it says so
    saved = (state.get("algorithm", "ppo"), state.get("group_size", 1))
    if saved != (config.algorithm, config.group_size):
        raise UserError(f"{folder} was written by --algorithm {saved[0]} with {saved[1]} sample(s) per prompt; "
                        f"this run has --algorithm {config.algorithm} with {config.group_size}: "
                        "resume with the same settings, or start a new run")


STAT_KEYS = ("loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "val/clipfrac")
CRITIC_FREE_STAT_KEYS = ("loss/policy", "policy/approxkl", "policy/clipfrac")
VALUE_HEAD_FILE = "value_head.safetensors"
STATE_FILE = "run_state.json"  # the run's own states (PPOTrainer._run_state), plain JSON


def load_policy_weights(model: PolicyWithValueHead, folder: str) -> None:
    """Load the adapter (or full model) and value head ``save_model`` wrote into ``model``; a key missing from the
    files or not in the model is a ``UserError`` naming it."""
    from safetensors.torch import load_file

    def check(missing, unexpected, what):
        if missing or unexpected:
            raise UserError(f"{folder}: the {what} does not match the model: missing {sorted(missing)[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}")

    head = load_file(os.path.join(folder, VALUE_HEAD_FILE))
    check(set(model.value_head.state_dict()) - set(head), set(head) - set(model.value_head.state_dict()), "value head")
    model.value_head.load_state_dict(head)
    policy = model.policy
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        expected = set(get_peft_model_state_dict(policy))
        check(expected - set(saved), set(saved) - expected, "adapter")
        set_peft_model_state_dict(policy, saved)
        return
    files = sorted(f for f in os.listdir(folder) if f.startswith("model") and f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{folder} holds neither an adapter nor model weights")
    saved = {}
    for name in files:
        saved.update(load_file(os.path.join(folder, name)))
    tied = set(getattr(policy, "all_tied_weights_keys", None) or {})
    own = set(policy.state_dict())
    check(own - set(saved) - tied, set(saved) - own, "model")
    policy.load_state_dict(saved, strict=False)
