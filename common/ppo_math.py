"""The PPO math for RLHF: pure functions and small stateful helpers, with the papers' names.

Shapes: ``B`` responses, ``R`` response tokens (padded), ``V`` vocabulary. Every per-token tensor is ``[B, R]`` and
aligned with the response tokens ``a_1..a_R``; ``mask`` is 1 up to and including the first EOS and 0 after it.
Each function is pinned against hand-computed cases in tests/test_ppo_math.py; docs/ppo.md gives the sources.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries; ``reduce(t)`` sums ``t`` across processes (DDP), if given.

    The variance is the unbiased one over all unmasked tokens of the (global) batch (advantage normalisation:
    Huang et al. 2022, "37 details", #7).
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce=None) -> float:
    """``1 - Var(R - V) / Var(R)`` over the unmasked tokens (sums across processes with ``reduce``); NaN if Var(R) = 0.

    1 means the value head predicts every return, 0 no better than the mean return, below 0 worse than that.
    """
    resid = returns - values
    stats = torch.stack([(returns * mask).sum(), (returns**2 * mask).sum(), (resid * mask).sum(),
                         (resid**2 * mask).sum(), mask.sum()]).double()
    if reduce is not None:
        stats = reduce(stats)
    s_r, s_rr, s_e, s_ee, n = stats.tolist()
    if n < 2:
        return float("nan")
    var_r = s_rr / n - (s_r / n) ** 2
    var_e = s_ee / n - (s_e / n) ** 2
    return 1.0 - var_e / var_r if var_r > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Rewards and advantages
# ----------------------------------------------------------------------------------------------------------------


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


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO's leave-one-out baseline (Ahmadian et al. 2024, eq. 5; Kool et al. 2019): ``[B]`` rewards of ``B / k``
    groups of ``k`` consecutive samples of the same prompt -> ``A_i = r_i - mean_{j != i} r_j`` over ``i``'s group."""
    g = rewards.reshape(-1, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def group_advantages(scores: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, sec. 4.1.2): ``[B]`` scores of groups of ``k``
    consecutive samples -> ``(s_i - mean(group)) / (std(group) + eps)``, std unbiased as TRL computes it.

    ``scale``: ``group`` (GRPO), ``batch`` (one std over ``scores``: this process's batch; TRL takes the global
    batch's) or ``none`` (Dr. GRPO, Liu et al. 2025: no division, which biases questions that are too easy or too
    hard less)."""
    g = scores.reshape(-1, k)
    adv = g - g.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (g.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (scores.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return adv.reshape(-1)


def token_weights(mask: torch.Tensor, loss_type: str, n_tokens, n_sequences, max_length: int) -> torch.Tensor:
    """``[B, R]`` weight of each response token's loss in an optimizer step whose losses are ``sum(weight * loss)``.

    ``n_tokens`` and ``n_sequences`` count the whole optimizer step (all micro-batches and processes), so the
    weights of a step add up to 1 (``token``, ``grpo``) whatever its split. ``loss_type``:
    ``token``: every token alike, ``mask / n_tokens`` (PPO's, and DAPO's "token-level" loss);
    ``grpo``: each sequence's mean over its tokens, then the mean over sequences (the GRPO paper's eq. 3), which
    weighs a token of a long answer less;
    ``dr_grpo``: sums over tokens divided by ``n_sequences * max_length`` (Dr. GRPO, Liu et al. 2025), a constant
    that does not depend on the answers' lengths."""
    if loss_type == "token":
        return mask / n_tokens
    if loss_type == "grpo":
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / n_sequences
    if loss_type == "dr_grpo":
        return mask / (n_sequences * max_length)
    raise ValueError(f"loss_type must be token, grpo or dr_grpo, got {loss_type!r}")


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def _clipped_surrogate(logprobs, old_logprobs, advantages, cliprange: float):
    """Per token: the log-ratio, and the unclipped and clipped terms ``-A * ratio``, ``-A * clip(ratio)``, of PPO's
    surrogate (its loss is their maximum); shared by ``ppo_losses`` and ``critic_free_losses``."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    return logratio, -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)


def ppo_losses(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor,
    advantages: torch.Tensor, *, returns: torch.Tensor, mask: torch.Tensor,
    cliprange: float, cliprange_value: float | None, vf_coef: float, n_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate and clipped value loss (Schulman et al. 2017, eq. 7 and 9; CleanRL ``ppo.py``).

    Every term is a sum over the unmasked tokens divided by ``n_tokens``: the number of response tokens in the
    whole optimizer step (all micro-batches, all processes), so the loss, and its gradient, do not depend on how
    that step's rows are split into micro-batches or across processes. ``n_tokens=None`` divides by this batch's
    own token count (its masked mean). ``cliprange_value=None`` turns value clipping off. The statistics are
    token sums divided by ``n_tokens`` too, so they add up over micro-batches.
    """
    n = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    logratio, pg_losses, pg_losses2 = _clipped_surrogate(logprobs, old_logprobs, advantages, cliprange)
    pg_loss = (torch.max(pg_losses, pg_losses2) * mask).sum() / n

    vf_losses = (values - returns) ** 2
    if cliprange_value is None:
        vf_losses2 = vf_losses
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        vf_losses2 = (values_clipped - returns) ** 2
    v_loss = 0.5 * (torch.max(vf_losses, vf_losses2) * mask).sum() / n

    loss = pg_loss + vf_coef * v_loss
    with torch.no_grad():
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": v_loss.detach(),
            "policy/approxkl": 0.5 * (logratio**2 * mask).sum() / n,
            "policy/clipfrac": ((pg_losses2 > pg_losses).float() * mask).sum() / n,
            "val/clipfrac": ((vf_losses2 > vf_losses).float() * mask).sum() / n,
        }
    return loss, stats


def critic_free_losses(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, *, weights: torch.Tensor, n_tokens, cliprange: float, kl_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's and GRPO's loss: the clipped surrogate with one advantage per sequence (``[B]``, broadcast to its
    tokens), plus ``kl_coef`` times the per-token KL estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3,
    unbiased and >= 0; GRPO's eq. 4; RLOO passes 0, its KL is in the reward). Each term is ``sum(weights * term)``
    with ``weights`` from ``token_weights``. No value loss: these methods have no critic. The statistics are token
    means (``mask / n_tokens``, as ``ppo_losses`` reports them), whatever the loss's weights."""
    logratio, pg_losses, pg_losses2 = _clipped_surrogate(logprobs, old_logprobs, advantages[:, None], cliprange)
    pg_loss = (torch.max(pg_losses, pg_losses2) * weights).sum()
    loss = pg_loss
    delta = ref_logprobs - logprobs
    kl = torch.exp(delta) - delta - 1.0
    if kl_coef:
        loss = loss + kl_coef * (kl * weights).sum()
    with torch.no_grad():
        per_token = mask / n_tokens
        stats = {
            "loss/policy": (torch.max(pg_losses, pg_losses2) * per_token).sum(),
            "loss/kl": (kl * per_token).sum(),
            "policy/approxkl": 0.5 * (logratio**2 * per_token).sum(),
            "policy/clipfrac": ((pg_losses2 > pg_losses).float() * per_token).sum(),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy over the vocabulary, in chunks
# ----------------------------------------------------------------------------------------------------------------

CHUNK_ELEMENTS = 2**22  # float32 elements per chunk of rows: 16 MiB, whatever the vocabulary


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _scaled_float(rows: torch.Tensor, temperature: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows / temperature`` in float32: one new chunk (or into ``out``)."""
    return torch.div(rows.float() if rows.dtype != torch.float32 else rows, temperature, out=out)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits / temperature)[token]`` per row, without a float32 copy of all the logits.

    The forward and the backward work on row chunks of ``CHUNK_ELEMENTS`` float32 elements; only the input logits
    (in their own dtype, kept by autograd for the LM head anyway) and one float32 log-sum-exp per row are saved.
    Gradient: ``(onehot(token) - softmax) * grad / temperature``, written chunk by chunk into the gradient tensor
    (in place when the logits are float32, through one float32 chunk otherwise).
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        step = _rows_per_chunk(logits.shape[-1])
        for s in range(0, rows, step):
            x = _scaled_float(logits[s : s + step], temperature)
            torch.logsumexp(x, -1, out=lse[s : s + step])
            out[s : s + step] = x.gather(-1, tokens[s : s + step, None]).squeeze(-1) - lse[s : s + step]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(logits)
        step = _rows_per_chunk(logits.shape[-1])
        for s in range(0, logits.shape[0], step):
            e = min(s + step, logits.shape[0])
            g = grad_out[s:e, None].float() / t
            chunk = grad[s:e] if grad.dtype == torch.float32 else None
            chunk = _scaled_float(logits[s:e], t, out=chunk).sub_(lse[s:e, None]).exp_().mul_(-g)  # -softmax * g
            chunk.scatter_add_(-1, tokens[s:e, None], g)
            if chunk.data_ptr() != grad[s:e].data_ptr():
                grad[s:e] = chunk
        return grad, None, None


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of ``tokens`` under ``softmax(logits / temperature)``: ``[..., V]`` -> ``[...]``, float32.

    Gather, then log-sum-exp, in row chunks (``_SelectiveLogSoftmax``): no float32 ``[B, R, V]`` log-softmax.
    """
    shape = tokens.shape
    flat = _SelectiveLogSoftmax.apply(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), float(temperature))
    return flat.reshape(shape)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position, float32, computed in row chunks:
    ``H = logsumexp(x) - sum(softmax(x) * x)``."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    step = _rows_per_chunk(flat.shape[-1])
    for s in range(0, flat.shape[0], step):
        x = _scaled_float(flat[s : s + step], temperature)
        lse = torch.logsumexp(x, -1, keepdim=True)
        weighted = (x - lse).exp_().mul_(x)  # softmax * x
        out[s : s + step] = lse.squeeze(-1) - weighted.sum(-1)
    return out.reshape(logits.shape[:-1])


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
# Small stateful helpers (each saved in a checkpoint's run_state.json, common/ppo_checkpoint.py)
# ----------------------------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: ``kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController(AdaptiveKLController):
    """A constant coefficient (``--adap_kl_ctrl false``)."""

    def __init__(self, kl_coef: float):
        super().__init__(kl_coef, target=1.0, horizon=1)

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

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


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
