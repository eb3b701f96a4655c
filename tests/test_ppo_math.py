"""The PPO math (common/ppo_math.py) pinned against small hand-computed cases (docs/design.md, "PPO, RLOO and GRPO").

Every expected number here is either written out (computed by hand, the working in the comments) or produced
by a plain per-sequence Python loop in this file, never by the code under test.
"""

import math

import numpy as np
import pytest
import torch

import common.ppo_math
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
    logprobs_from_logits,
    masked_whiten,
    position_ids_for,
    ppo_losses,
    rloo_advantages,
    token_weights,
)

D = torch.float64


def t(x, **kw):
    return torch.tensor(x, dtype=D, **kw)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 1. compute_rewards
# ----------------------------------------------------------------------------------------------------------------


def test_compute_rewards_hand_case_different_lengths():
    # three responses of lengths 3, 4 and 1 in a batch padded to R = 4 (mask 1 up to and including the EOS)
    logp = t([[-1.0, -2.0, -0.5, -3.0], [-0.2, -1.5, -1.0, -0.7], [-0.3, -0.3, -0.3, -0.3]])
    ref = t([[-1.5, -1.0, -0.5, -2.0], [-0.4, -1.0, -2.0, -0.1], [-0.1, -9.0, -9.0, -9.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    scores = t([2.0, -1.0, 0.5])
    logp_before, ref_before, mask_before = logp.clone(), ref.clone(), mask.clone()

    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef=0.1)

    # kl_t = logp - ref, zero where masked
    # row 0: [0.5, -1.0, 0.0, (-1.0 masked -> 0)]
    # row 1: [0.2, -0.5, 1.0, -0.6]
    # row 2: [-0.2, (8.7 masked -> 0), 0, 0]
    close(kl, [[0.5, -1.0, 0.0, 0.0], [0.2, -0.5, 1.0, -0.6], [-0.2, 0.0, 0.0, 0.0]])
    # r_t = -0.1 * kl_t, plus the score on the last unmasked token:
    # row 0: [-0.05, 0.1, -0.0 + 2.0, 0]          (last unmasked = index 2)
    # row 1: [-0.02, 0.05, -0.1, 0.06 - 1.0]      (last unmasked = index 3)
    # row 2: [0.02 + 0.5, 0, 0, 0]                (last unmasked = index 0)
    close(rewards, [[-0.05, 0.1, 2.0, 0.0], [-0.02, 0.05, -0.1, -0.94], [0.52, 0.0, 0.0, 0.0]])
    # the inputs are not modified in place
    assert torch.equal(logp, logp_before) and torch.equal(ref, ref_before) and torch.equal(mask, mask_before)


def test_compute_rewards_matches_loop_float32():
    g = torch.Generator().manual_seed(1)
    B, R, kl_coef = 5, 7, 0.05
    lengths = [7, 1, 4, 2, 6]
    logp = -torch.rand(B, R, generator=g) * 3
    ref = -torch.rand(B, R, generator=g) * 3
    scores = torch.randn(B, generator=g)
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    rewards, kl = compute_rewards(scores, logp, ref, mask, kl_coef)
    for b, n in enumerate(lengths):
        for i in range(R):
            k = float(logp[b, i] - ref[b, i]) if i < n else 0.0
            r = -kl_coef * k + (float(scores[b]) if i == n - 1 else 0.0)
            assert kl[b, i].item() == pytest.approx(k, abs=1e-6)
            assert rewards[b, i].item() == pytest.approx(r, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 2. compute_gae
# ----------------------------------------------------------------------------------------------------------------


def gae_loop(rewards, values, length, gamma, lam):
    """Textbook GAE on one sequence of ``length`` tokens, V beyond the last token = 0."""
    adv = [0.0] * length
    last = 0.0
    for i in reversed(range(length)):
        next_v = values[i + 1] if i + 1 < length else 0.0
        delta = rewards[i] + gamma * next_v - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    return adv, [a + v for a, v in zip(adv, values[:length])]


def test_compute_gae_hand_case_gamma_1():
    # gamma = 1, lam = 0.95, rewards [0, 0, 1], values [0.5, 0.2, 0.4]
    # t=2: delta = 1 + 0 - 0.4 = 0.6;         A2 = 0.6
    # t=1: delta = 0 + 0.4 - 0.2 = 0.2;       A1 = 0.2 + 0.95 * 0.6 = 0.77
    # t=0: delta = 0 + 0.2 - 0.5 = -0.3;      A0 = -0.3 + 0.95 * 0.77 = 0.4315
    # row 2 is the same start with padding: rewards [0, 1, 99, 99], values [0.5, 0.2, 7, 7], mask [1, 1, 0, 0]
    # t=1: delta = 1 + 0 (V past the last token) - 0.2 = 0.8;  A1 = 0.8
    # t=0: delta = 0 + 0.2 - 0.5 = -0.3;                        A0 = -0.3 + 0.95 * 0.8 = 0.46
    rewards = t([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 99.0, 99.0]])
    values = t([[0.5, 0.2, 0.4, 0.0], [0.5, 0.2, 7.0, 7.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.4315, 0.77, 0.6, 0.0], [0.46, 0.8, 0.0, 0.0]])
    close(ret, [[0.9315, 0.97, 1.0, 0.0], [0.96, 1.0, 0.0, 0.0]])  # R = A + V


def test_compute_gae_hand_case_gamma_below_1():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72), rewards [0, 0, 1], values [0.5, 0.2, 0.4]
    # t=2: delta = 1 - 0.4 = 0.6;                  A2 = 0.6
    # t=1: delta = 0.9 * 0.4 - 0.2 = 0.16;         A1 = 0.16 + 0.72 * 0.6 = 0.592
    # t=0: delta = 0.9 * 0.2 - 0.5 = -0.32;        A0 = -0.32 + 0.72 * 0.592 = 0.10624
    adv, ret = compute_gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.4]]), t([[1, 1, 1]]), gamma=0.9, lam=0.8)
    close(adv, [[0.10624, 0.592, 0.6]])
    close(ret, [[0.60624, 0.792, 1.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_compute_gae_matches_per_sequence_loop(gamma, lam):
    g = torch.Generator().manual_seed(2)
    B, R = 4, 6
    lengths = [6, 3, 1, 5]
    mask = t([[1] * n + [0] * (R - n) for n in lengths])
    rewards = torch.randn(B, R, generator=g, dtype=D)
    values = torch.randn(B, R, generator=g, dtype=D)
    # garbage in the padding must not leak into earlier advantages
    rewards_junk = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e3))
    values_junk = torch.where(mask.bool(), values, torch.full_like(values, -1e3))
    adv, ret = compute_gae(rewards_junk, values_junk, mask, gamma, lam)
    for b, n in enumerate(lengths):
        ea, er = gae_loop(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        close(adv[b], ea + [0.0] * (R - n), atol=1e-10)
        close(ret[b], er + [0.0] * (R - n), atol=1e-10)
    close(ret, (adv + values) * mask, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# 3. masked_whiten
# ----------------------------------------------------------------------------------------------------------------

X = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, -50.0]]
XM = [[1, 1, 1, 0], [1, 1, 0, 0]]


def test_masked_whiten_hand_case_unbiased():
    # unmasked entries 1, 2, 3, 4, 5: mean 3; UNBIASED variance (4 + 1 + 0 + 1 + 4) / (5 - 1) = 2.5
    # whitened = (x - 3) / sqrt(2.5) = [-2, -1, 0, 1, 2] * 0.6324555320
    w = masked_whiten(t(X), t(XM))
    s = 1 / math.sqrt(2.5)
    close(w, [[-2 * s, -1 * s, 0.0, 0.0], [1 * s, 2 * s, 0.0, 0.0]])
    # not the population variance (2.0), which would give (x - 3) / sqrt(2)
    assert abs(w[1, 1].item() - 2 / math.sqrt(2.0)) > 0.1
    vals = w[t(XM).bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-7)
    assert vals.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)


def test_masked_whiten_keep_mean():
    # shift_mean=False: (x - 3) / sqrt(2.5) + 3, masked entries still zero
    w = masked_whiten(t(X), t(XM), shift_mean=False)
    s = 1 / math.sqrt(2.5)
    close(w, [[3 - 2 * s, 3 - s, 3.0, 0.0], [3 + s, 3 + 2 * s, 0.0, 0.0]])
    assert w[t(XM).bool()].mean().item() == pytest.approx(3.0, abs=1e-7)


def test_masked_whiten_float32_masked_zero():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g) * 4 + 2
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    w = masked_whiten(x, mask)
    vals = np.array([x[i, j].item() for i in range(3) for j in range(5) if mask[i, j]])
    expected = (vals - vals.mean()) / vals.std(ddof=1)
    got = w[mask.bool()].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (w[~mask.bool()] == 0).all()


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_reduce_two_processes_equals_full_batch(shift_mean):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=D) * 3 + 1
    lengths = [5, 2, 4, 1, 3, 5]
    mask = t([[1] * n + [0] * (5 - n) for n in lengths])
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]

    # each "process" first records its local statistics (whatever the function reduces)...
    local = []
    for xh, mh in halves:
        masked_whiten(xh, mh, shift_mean, reduce=lambda s: local.append(s.clone()) or s)
    assert len(local) == 2
    # ...then the all-reduce sums its own statistics with the other process's
    out = []
    for k, (xh, mh) in enumerate(halves):
        other = local[1 - k]
        out.append(masked_whiten(xh, mh, shift_mean, reduce=lambda s, other=other: s + other))
    full = masked_whiten(x, mask, shift_mean)
    close(torch.cat(out), full, atol=1e-10)
    # and the full batch is whitened over all its unmasked tokens (checked independently with numpy)
    vals = x[mask.bool()].numpy()
    exp = (vals - vals.mean()) / vals.std(ddof=1) + (0.0 if shift_mean else vals.mean())
    np.testing.assert_allclose(full[mask.bool()].numpy(), exp, atol=1e-7)
    # without the reduce, a half would be whitened with its own statistics (so the reduce matters)
    assert not torch.allclose(masked_whiten(*halves[0], shift_mean), full[:3], atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# 4. ppo_losses
# ----------------------------------------------------------------------------------------------------------------


def _losses_case():
    old = t([[-1.0, -1.0, -1.0]])
    logp = (old + t([[math.log(1.5), math.log(0.9), math.log(0.5)]])).requires_grad_(True)  # ratio 1.5, 0.9, 0.5
    adv = t([[1.0, -2.0, -1.0]])
    old_v = t([[0.0, 1.0, 0.5]])
    values = t([[0.5, 1.1, 0.0]], requires_grad=True)
    returns = t([[1.0, 0.0, 0.5]])
    mask = t([[1, 1, 1]])
    return logp, old, values, old_v, adv, returns, mask


def test_ppo_losses_hand_case_1x3():
    logp, old, values, old_v, adv, returns, mask = _losses_case()
    loss, stats = ppo_losses(logp, old, values, old_v, adv, returns=returns, mask=mask, cliprange=0.2,
                             cliprange_value=0.2,
                             vf_coef=0.1)

    # policy, cliprange 0.2 -> ratio clipped to [0.8, 1.2]:
    # tok0 A= 1, r=1.5: -A*r = -1.5, -A*clip = -1.2 -> max -1.2  (clipped branch active)
    # tok1 A=-2, r=0.9: -A*r =  1.8, -A*clip =  1.8 -> max  1.8  (in range)
    # tok2 A=-1, r=0.5: -A*r =  0.5, -A*clip =  0.8 -> max  0.8  (clipped branch active)
    pg = (-1.2 + 1.8 + 0.8) / 3  # 0.466666...
    assert stats["loss/policy"].item() == pytest.approx(pg, abs=1e-9)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 3, abs=1e-9)

    # value, cliprange_value 0.2:
    # tok0 V=0.5, Vold=0.0, R=1.0: Vc = 0.2; (0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64 -> 0.64 (clipped branch active)
    # tok1 V=1.1, Vold=1.0, R=0.0: Vc = 1.1; 1.21, 1.21               -> 1.21 (in range)
    # tok2 V=0.0, Vold=0.5, R=0.5: Vc = 0.3; (0-0.5)^2 = 0.25, (0.3-0.5)^2 = 0.04 -> 0.25 (unclipped wins)
    v = 0.5 * (0.64 + 1.21 + 0.25) / 3  # 0.35
    assert stats["loss/value"].item() == pytest.approx(v, abs=1e-9)
    assert stats["val/clipfrac"].item() == pytest.approx(1 / 3, abs=1e-9)

    assert loss.item() == pytest.approx(pg + 0.1 * v, abs=1e-9)  # 0.501666...
    # approx_kl = 0.5 * mean(log(r)^2) = 0.5 * (0.1644019 + 0.0111008 + 0.4804530) / 3 = 0.1093260
    assert stats["policy/approxkl"].item() == pytest.approx(0.1093260, abs=1e-6)
    assert stats["policy/approxkl"].item() == pytest.approx(
        0.5 * (math.log(1.5) ** 2 + math.log(0.9) ** 2 + math.log(0.5) ** 2) / 3, abs=1e-12)

    loss.backward()
    # d loss / d logp: clipped tokens 0; tok1: d(-A * exp(logp - old))/dlogp / 3 = -A * r / 3 = 2 * 0.9 / 3 = 0.6
    close(logp.grad, [[0.0, 0.6, 0.0]], atol=1e-9)
    # d loss / d V = vf_coef * 0.5 / 3 * d max/dV: tok0 clipped (0); tok1 2 (V - R) = 2.2; tok2 2 (V - R) = -1.0
    close(values.grad, [[0.0, 0.1 * 0.5 / 3 * 2.2, 0.1 * 0.5 / 3 * -1.0]], atol=1e-9)


def test_ppo_losses_mask_and_out_of_range_unclipped_branch():
    # 1x4, last token masked (with absurd numbers that must not count anywhere)
    old = t([[-1.0, -1.0, -1.0, -1.0]])
    # r = 1.5, 0.5, 1.1, e^5
    logp = (old + t([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, 100.0]])
    values = t([[0.0, 0.0, 0.0, 50.0]], requires_grad=True)
    old_v, returns = t([[0.0, 0.0, 0.0, 0.0]]), t([[0.0, 0.0, 0.0, -50.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = ppo_losses(logp, old, values, old_v, adv, returns=returns, mask=mask, cliprange=0.2,
                             cliprange_value=0.2,
                             vf_coef=0.5)
    # tok0 A=1, r=1.5: max(-1.5, -1.2) = -1.2 clipped, grad 0
    # tok1 A=1, r=0.5: max(-0.5, -0.8) = -0.5 unclipped although r is out of range: grad -A*r/3 = -0.5/3
    # tok2 A=-1, r=1.1: max(1.1, 1.1) = 1.1 in range: grad -A*r/3 = 1.1/3
    assert stats["loss/policy"].item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-9)
    assert stats["policy/clipfrac"].item() == pytest.approx(1 / 3, abs=1e-9)
    assert stats["loss/value"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["val/clipfrac"].item() == 0.0
    assert stats["policy/approxkl"].item() == pytest.approx(
        0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3, abs=1e-12)
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 3, 1.1 / 3, 0.0]], atol=1e-9)
    close(values.grad, [[0.0, 0.0, 0.0, 0.0]], atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 5. KL controllers
# ----------------------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_known_numbers():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, 256)  # error 6.6/6 - 1 = 0.1 -> 0.2 * (1 + 0.1 * 0.0256) = 0.200512
    assert ctl.value == pytest.approx(0.200512, abs=1e-12)
    ctl.update(30.0, 256)  # error 4 clipped to +0.2 -> * 1.00512 = 0.20153862144
    assert ctl.value == pytest.approx(0.20153862144, abs=1e-12)
    ctl.update(0.0, 1000)  # error -1 clipped to -0.2 -> * (1 - 0.2 * 0.1) = * 0.98 = 0.1975078490112
    assert ctl.value == pytest.approx(0.1975078490112, abs=1e-12)
    ctl.update(6.0, 5000)  # at target: unchanged
    assert ctl.value == pytest.approx(0.1975078490112, abs=1e-12)
    ctl.update(4.8, 5000)  # error -0.2 exactly (at the limit) -> * (1 - 0.2 * 0.5) = * 0.9 = 0.17775706411008
    assert ctl.value == pytest.approx(0.17775706411008, abs=1e-12)


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    for kl, n in [(100.0, 256), (0.0, 10**6), (-3.0, 1), (6.0, 64)]:
        ctl.update(kl, n)
        assert ctl.value == 0.05


# ----------------------------------------------------------------------------------------------------------------
# 6. RunningMoments
# ----------------------------------------------------------------------------------------------------------------


def test_running_moments_match_numpy_over_concatenation():
    batches = [[1.0, 2.0, 3.0], [10.0], [4.0, 5.0, 6.0, 7.0, 8.0], [-2.5, 0.5]]
    rm = RunningMoments()
    seen = []
    for b in batches:
        rm.update(torch.tensor(b, dtype=torch.float32))
        seen += b
        arr = np.array(seen)
        assert rm.mean == pytest.approx(arr.mean(), abs=1e-9)
        if len(seen) > 1:
            assert rm.std == pytest.approx(arr.std(ddof=1), abs=1e-9)  # unbiased (n - 1) std
    arr = np.array(seen)  # 11 values summing to 44: mean 4.0; std is the unbiased one, not the population one
    assert rm.mean == pytest.approx(4.0, abs=1e-9)
    assert rm.std == pytest.approx(math.sqrt(((arr - 4.0) ** 2).sum() / 10), abs=1e-9)
    assert abs(rm.std - arr.std(ddof=0)) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# 7. Token normalisation across micro-batches, value clipping off, explained variance
# ----------------------------------------------------------------------------------------------------------------


def test_ppo_losses_over_the_steps_token_count_add_up_across_micro_batches():
    # Two micro-batches of 3 and 1 tokens: with n_tokens = 4 their losses add up to the loss of the whole batch
    # (a mean over its 4 tokens); each micro-batch's own mean would weigh the lone token 3x as much.
    g = torch.Generator().manual_seed(8)
    logp, old, adv = (torch.randn(2, 3, generator=g, dtype=D) for _ in range(3))
    values, old_v, ret = (torch.randn(2, 3, generator=g, dtype=D) for _ in range(3))
    mask = t([[1, 1, 1], [1, 0, 0]])
    args = {"cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1}
    whole, whole_stats = ppo_losses(logp, old, values, old_v, adv, returns=ret, mask=mask, **args)
    parts = [ppo_losses(logp[i : i + 1], old[i : i + 1], values[i : i + 1], old_v[i : i + 1], adv[i : i + 1],
                        returns=ret[i : i + 1], mask=mask[i : i + 1], **args, n_tokens=4.0) for i in range(2)]
    close(parts[0][0] + parts[1][0], whole, atol=1e-12)
    for key in whole_stats:
        close(parts[0][1][key] + parts[1][1][key], whole_stats[key], atol=1e-12)
    own_means = [ppo_losses(logp[i : i + 1], old[i : i + 1], values[i : i + 1], old_v[i : i + 1], adv[i : i + 1],
                            returns=ret[i : i + 1], mask=mask[i : i + 1], **args)[0] for i in range(2)]
    assert abs((own_means[0] + own_means[1]) / 2 - whole.item()) > 1e-3  # the per-micro-batch mean is another loss


def test_ppo_losses_without_value_clipping():
    logp, old, values, old_v, adv, returns, mask = _losses_case()
    _, stats = ppo_losses(logp, old, values, old_v, adv, returns=returns, mask=mask, cliprange=0.2,
                          cliprange_value=None,
                          vf_coef=0.1)
    # unclipped: 0.5 * ((0.5-1)^2 + (1.1-0)^2 + (0-0.5)^2) / 3 = 0.5 * (0.25 + 1.21 + 0.25) / 3 = 0.285
    assert stats["loss/value"].item() == pytest.approx(0.285, abs=1e-9)
    assert stats["val/clipfrac"].item() == 0.0


def test_explained_variance_hand_case_and_two_processes():
    # returns [1, 2, 3, 4] (variance 1.25), values [1, 2, 3, 3]: residuals [0, 0, 0, 1], variance 0.1875
    # EV = 1 - 0.1875 / 1.25 = 0.85; the masked token (value 100) counts nowhere
    returns, values = t([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]]), t([[1.0, 2.0, 100.0], [3.0, 3.0, 0.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85, abs=1e-12)
    local = []
    for rows in (slice(0, 1), slice(1, 2)):  # what each process contributes, then the all-reduce sum
        explained_variance(values[rows], returns[rows], mask[rows], reduce=lambda s: local.append(s) or s)
    both = explained_variance(values[:1], returns[:1], mask[:1], reduce=lambda s: local[0] + local[1])
    assert both == pytest.approx(0.85)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert math.isnan(explained_variance(values, t([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0]]), mask))  # Var(R) = 0


# ----------------------------------------------------------------------------------------------------------------
# 8. Log-probs and entropy over the vocabulary, in chunks
# ----------------------------------------------------------------------------------------------------------------


def test_logprobs_and_entropy_from_logits_direct():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 5, generator=g, dtype=D) * 2
    tokens = torch.tensor([[0, 4, 2], [3, 3, 1]])
    lp = logprobs_from_logits(logits, tokens)
    ent = entropy_from_logits(logits)
    assert lp.shape == (2, 3) and ent.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            row = logits[b, i].tolist()
            lse = math.log(sum(math.exp(z) for z in row))
            assert lp[b, i].item() == pytest.approx(row[tokens[b, i]] - lse, abs=1e-6)
            ps = [math.exp(z - lse) for z in row]
            assert ent[b, i].item() == pytest.approx(-sum(p * math.log(p) for p in ps), abs=1e-6)
    # a tiny hand case: logits [0, 0] -> log-prob log(1/2), entropy log 2
    two = torch.zeros(1, 1, 2, dtype=D)
    assert logprobs_from_logits(two, torch.tensor([[1]])).item() == pytest.approx(-math.log(2))
    assert entropy_from_logits(two).item() == pytest.approx(math.log(2))
    # temperature 2: the log-probs of logits / 2; [0, 2] / 2 = [0, 1] -> log-prob of token 1 = 1 - log(1 + e)
    hot = logprobs_from_logits(t([[[0.0, 2.0]]]), torch.tensor([[1]]), 2.0)
    assert hot.item() == pytest.approx(1 - math.log(1 + math.e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_match_log_softmax_values_and_gradients(monkeypatch, dtype):
    monkeypatch.setattr(common.ppo_math, "CHUNK_ELEMENTS", 7 * 11)  # 7 rows per chunk: 3 chunks, the last partial
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 6, 11, generator=g) * 3).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 6), generator=g)
    weights = torch.randn(3, 6, generator=g)
    expected_logits = logits.detach().double().requires_grad_(True)
    expected = torch.log_softmax(expected_logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (expected * weights.double()).sum().backward()
    got = logprobs_from_logits(logits, tokens, 0.7)
    (got * weights).sum().backward()
    # The expectations start from the same (bf16) logits, so a float32 computation is as close in both dtypes:
    # measured 7e-7 for the log-probs, 4e-6 for the entropy. The same in bf16 errs by 5e-2 and 9e-3.
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=0)
    assert logits.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(logits.grad.double(), expected_logits.grad, atol=1e-5, rtol=0)  # measured 4e-7
    else:
        # a bf16 gradient is the float32 one rounded once: the exact gradient rounded to bf16 (equal when measured),
        # or one bf16 step (2**-7 relative) off where the float32 value lands across a rounding midpoint
        exact = expected_logits.grad.to(torch.bfloat16).double()
        torch.testing.assert_close(logits.grad.double(), exact, atol=1e-5, rtol=2**-7)
    probs = torch.softmax(logits.detach().double() / 0.7, -1)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits.detach(), 0.7).double(), entropy, atol=1e-4, rtol=0)


def test_position_ids_for_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]])
    assert position_ids_for(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 2], [0, 0, 0, 0, 0]]


def test_checkpointed_helpers_continue_exactly_from_their_state(tmp_path):
    kl = AdaptiveKLController(0.2, 6.0, 100)
    kl.update(9.0, 10)
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 5.0, 2.0]))
    stream = PromptStream(10, 3, seed=4)
    first_pass = [stream.next_indices(1, 0) for _ in range(3)]  # 9 distinct prompts of 10; the 10th is skipped
    assert len(set(sum(first_pass, []))) == 9 and stream.epoch == 0
    lengths = LengthSampler(4, 9, seed=3)
    drawn = [lengths() for _ in range(50)]
    assert set(drawn) == set(range(4, 10))  # both ends included
    progress = Progress(step=7, episodes=56, skipped_steps=1, consecutive_skips=0)
    fresh = [AdaptiveKLController(1.0, 6.0, 100), RunningMoments(), PromptStream(10, 3, 4), LengthSampler(4, 9, 0),
             Progress()]
    for obj, new in zip((kl, moments, stream, lengths, progress), fresh):
        path = tmp_path / "state.pt"
        torch.save(obj.state_dict(), path)  # as accelerate saves it; plain data, so it loads with weights_only
        new.load_state_dict(torch.load(path, weights_only=True))
        assert new.state_dict() == obj.state_dict()
    new_kl, new_moments, new_stream, new_lengths, _ = fresh
    assert [lengths() for _ in range(20)] == [new_lengths() for _ in range(20)]
    assert stream.next_indices(1, 0) == new_stream.next_indices(1, 0) and stream.epoch == new_stream.epoch == 1
    kl.update(2.0, 10), new_kl.update(2.0, 10)
    assert kl.value == new_kl.value != 0.2
    assert (moments.mean, moments.std) == (new_moments.mean, new_moments.std)
    # mean 8/3; unbiased variance ((1 - 8/3)^2 + (5 - 8/3)^2 + (2 - 8/3)^2) / 2 = (25/9 + 49/9 + 4/9) / 2 = 13/3
    assert (moments.mean, moments.std) == (pytest.approx(8 / 3), pytest.approx(math.sqrt(13 / 3)))


# ----------------------------------------------------------------------------------------------------------------
# RLOO and GRPO (training_rl.py --algorithm rloo|grpo)
# ----------------------------------------------------------------------------------------------------------------


def test_rloo_leave_one_out_baseline_hand_case():
    # one group of 4: r = 1, 2, 3, 6; baselines (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=D), 4)
    torch.testing.assert_close(adv, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], dtype=D))
    # two groups of 2 (consecutive rows): each answer's baseline is the other one
    adv = rloo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0], dtype=D), 2)
    torch.testing.assert_close(adv, torch.tensor([-2.0, 2.0, 0.0, 0.0], dtype=D))


def test_grpo_group_advantages_with_and_without_std_hand_case():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=D)
    # mean 3; deviations -2, -1, 0, 3; unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3) = 2.16025
    std = math.sqrt(14 / 3)
    torch.testing.assert_close(group_advantages(scores, 4, "group"),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=D) / (std + 1e-4))
    # Dr. GRPO: centred, not divided
    torch.testing.assert_close(group_advantages(scores, 4, "none"), torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=D))
    # groups of 2: [1, 3] and [10, 14]; group stds sqrt(2) and sqrt(8): both groups become -0.7071, +0.7071
    two = torch.tensor([1.0, 3.0, 10.0, 14.0], dtype=D)
    torch.testing.assert_close(group_advantages(two, 2, "group"),
                               torch.tensor([-1 / (2**0.5 + 1e-4), 1 / (2**0.5 + 1e-4), -2 / (8**0.5 + 1e-4),
                                             2 / (8**0.5 + 1e-4)], dtype=D))
    # one std for the batch: mean 7, squares 36 + 16 + 9 + 49 = 110, unbiased var 110 / 3
    torch.testing.assert_close(group_advantages(two, 2, "batch"),
                               torch.tensor([-1.0, 1.0, -2.0, 2.0], dtype=D) / (math.sqrt(110 / 3) + 1e-4))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(two, 2, "std")


def test_token_weights_of_the_three_loss_types_hand_case():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=D)  # answers of 3 and 1 tokens
    # token: every token 1 / 4
    torch.testing.assert_close(token_weights(mask, "token", 4, 2, 4), mask / 4)
    # grpo: each answer's mean (1/3 per token, 1 for the single one), then the mean over 2 answers
    torch.testing.assert_close(token_weights(mask, "grpo", 4, 2, 4),
                               torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0.0], [0.5, 0.0, 0.0, 0.0]], dtype=D))
    # dr_grpo: 1 / (2 answers x max length 4) = 1/8 whatever the lengths
    torch.testing.assert_close(token_weights(mask, "dr_grpo", 4, 2, 4), mask / 8)
    with pytest.raises(ValueError, match="loss_type"):
        token_weights(mask, "seq", 4, 2, 4)


def test_critic_free_loss_and_gradient_hand_case():
    # One answer of 2 tokens, advantage 2, ratio 1 (logp = old), reference 0.5 below on the first token.
    logp = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    old, ref = torch.tensor([[-1.0, -2.0]], dtype=D), torch.tensor([[-1.5, -2.0]], dtype=D)
    mask = torch.ones(1, 2, dtype=D)
    w = mask / 2
    loss, stats = critic_free_losses(logp, old, ref, torch.tensor([2.0], dtype=D), mask, weights=w, n_tokens=2,
                                     cliprange=0.2, kl_coef=0.1)
    # policy: -A * ratio = -2 per token, mean -2; k3 KL: exp(-0.5) + 0.5 - 1 = 0.106531 and 0, mean 0.0532653
    k3 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx(-2 + 0.1 * k3 / 2, abs=1e-12)
    assert stats["loss/policy"].item() == pytest.approx(-2.0)
    assert stats["loss/kl"].item() == pytest.approx(k3 / 2)
    assert stats["policy/approxkl"].item() == 0 and stats["policy/clipfrac"].item() == 0
    loss.backward()
    # d/dlogp: -A * w = -1; KL: 0.1 * w * (1 - exp(ref - logp)) = 0.05 * (1 - exp(-0.5)) on the first token
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 + 0.05 * (1 - math.exp(-0.5)), -1.0]], dtype=D))
    # A ratio past 1 + cliprange with a positive advantage is clipped: no policy gradient, counted in clipfrac
    logp2 = (old + 0.5).clone().requires_grad_(True)
    loss, stats = critic_free_losses(logp2, old, old, torch.tensor([1.0], dtype=D), mask, weights=w, n_tokens=2,
                                     cliprange=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["policy/clipfrac"].item() == 1.0
    assert stats["policy/approxkl"].item() == pytest.approx(0.5 * 0.25)
    loss.backward()
    assert torch.all(logp2.grad == 0)
