"""PPO for RLHF on `accelerate` (docs/design.md, "PPO, RLOO and GRPO"; each detail and its source: docs/ppo.md).

``PPOConfig`` (common/ppo_config.py, re-exported here) holds every setting of the algorithm (parsed from the command
line by training_rl.py). ``PolicyWithValueHead`` is the policy with a scalar value head. ``PPOTrainer`` holds the
state of a run and does one PPO step at a time: rollout -> score -> old log-probs, values and reference log-probs ->
rewards -> advantages -> ``ppo_epochs`` of minibatch updates. The math is in common/ppo_math.py, checkpoints and
model files in common/ppo_checkpoint.py (``PPOTrainer``'s base class), the device plumbing (DeepSpeed, FSDP,
gradient synchronisation) in common/ppo_distributed.py. The trainer knows no judge: a held-out evaluation's gold
score comes from the ``judge`` its caller passes (``PPOTrainer.evaluate``).

Shapes: ``B`` responses per process, ``P`` padded prompt tokens, ``R`` response tokens (padded), ``V``
vocabulary, ``H`` hidden size. Per-token tensors are ``[B, R]``, aligned with the response tokens ``a_1..a_R``;
``mask`` is 1 up to and including the first EOS and 0 after it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import ppo_distributed as dist
from common.generation import eos_token_ids, sample_responses
from common.ppo_checkpoint import PPOCheckpoints, check_algorithm
from common.ppo_config import PPOConfig
from common.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    LengthSampler,
    Progress,
    PromptStream,
    RunningMoments,
    compute_gae,
    compute_rewards,
    critic_free_losses,
    entropy_from_logits,
    explained_variance,
    group_advantages,
    masked_mean,
    masked_whiten,
    position_ids_for,
    ppo_losses,
    response_logprobs,
    rloo_advantages,
    token_weights,
)

# What the notebook, the tests and users import from here; PPOConfig and check_algorithm live in
# common/ppo_config.py and common/ppo_checkpoint.py.
__all__ = ["PPOConfig", "PPOTrainer", "PolicyWithValueHead", "check_algorithm"]

# A held-out evaluation's gold judge, given by the caller: (rows, answers) -> a score per answer, None where none.
Judge = Callable[[list[dict], list[str]], list[float | None]]

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


class NonFiniteError(RuntimeError):
    """A step produced a NaN or infinity; the step is skipped (see ``PPOTrainer.step``)."""


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


class PPOTrainer(PPOCheckpoints):
    """State of a PPO run and one step at a time; checkpoints and model files come from the base class
    (common/ppo_checkpoint.py). Every process computes; only the main process writes files."""

    def __init__(self, accelerator, model: PolicyWithValueHead, tokenizer, *, reward_model, reward_tokenizer,
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
                                              pad_id=self.tokenizer.pad_token_id)
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
    def evaluate(self, rows: list[dict], seed: int, judge: Judge | None = None) -> dict:
        """Answers of the current policy to held-out ``rows`` (each with ``input_ids``, ``prompt`` and whatever
        ``judge`` reads), and their mean reward-model score, gold score and length, as ``eval/*`` metrics. The gold
        scores are the caller's ``judge(rows, answers)``, one per answer, None where it cannot judge one
        (training_rl.py passes the sample data's judge); ``eval/gold`` is None unless every answer has one. Sampled
        as in training, at the longest length, from a fixed seed, with the training RNG streams left as they were
        (so a resumed run continues exactly); every process answers its share of the rows."""
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
                                              pad_id=self.tokenizer.pad_token_id)
            lm.train(was_training)
        answers = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        texts = [render_answer(self.reward_tokenizer, row["prompt"], a) for row, a in zip(mine, answers)]
        rm = score_texts(self.reward_model, self.reward_tokenizer, texts, hp.reward_batch_size) if texts else None
        gold = [g for g in (judge(mine, answers) if judge is not None else []) if g is not None]
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
        stats = (self.update(b, old_logprobs, old_values, advantages, returns, ref_logprobs=ref_logprobs,
                             kl_coef=kl_coef)
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

    def update(self, b, old_logprobs, old_values, advantages, returns, *, ref_logprobs=None,
               kl_coef=0.0) -> dict | None:
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
                                advantages[mb_inds, :R], returns=returns[mb_inds, :R], mask=mask[mb_inds, :R],
                                cliprange=hp.cliprange, cliprange_value=hp.cliprange_value, vf_coef=hp.vf_coef,
                                n_tokens=n_tokens,
                            )
                        else:
                            mb_mask = mask[mb_inds, :R]
                            weights = token_weights(mb_mask, hp.loss_type or "token", n_tokens, n_seqs,
                                                    hp.output_max_length)
                            loss, stats = critic_free_losses(
                                logprobs, old_logprobs[mb_inds, :R], ref_logprobs[mb_inds, :R], advantages[mb_inds],
                                mb_mask, weights=weights, n_tokens=n_tokens, cliprange=hp.cliprange,
                                kl_coef=kl_coef if hp.algorithm == "grpo" else 0.0,
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

STAT_KEYS = ("loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "val/clipfrac")
CRITIC_FREE_STAT_KEYS = ("loss/policy", "policy/approxkl", "policy/clipfrac")
