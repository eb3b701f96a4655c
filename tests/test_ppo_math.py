"""The PPO math of common/ppo.py pinned against small hand-computed cases (DESIGN.md, section PPO).

Every expected number here is either written out (computed by hand, the working in the comments) or produced
by a plain per-sequence Python loop in this file, never by the code under test.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyWithValueHead,
    PPOTrainer,
    RunningMoments,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    logprobs_from_logits,
    masked_whiten,
    position_ids_for,
    ppo_losses,
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
    loss, stats = ppo_losses(logp, old, values, old_v, adv, returns, mask, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)

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
    logp = (old + t([[math.log(1.5), math.log(0.5), math.log(1.1), 5.0]])).requires_grad_(True)  # r = 1.5, 0.5, 1.1, e^5
    adv = t([[1.0, 1.0, -1.0, 100.0]])
    values = t([[0.0, 0.0, 0.0, 50.0]], requires_grad=True)
    old_v, returns = t([[0.0, 0.0, 0.0, 0.0]]), t([[0.0, 0.0, 0.0, -50.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = ppo_losses(logp, old, values, old_v, adv, returns, mask, 0.2, 0.2, 0.5)
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
# 7. logprobs, entropy, position ids
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
            assert lp[b, i].item() == pytest.approx(row[tokens[b, i]] - lse, abs=1e-10)
            ps = [math.exp(z - lse) for z in row]
            assert ent[b, i].item() == pytest.approx(-sum(p * math.log(p) for p in ps), abs=1e-10)
    # a tiny hand case: logits [0, 0] -> log-prob log(1/2), entropy log 2
    two = torch.zeros(1, 1, 2, dtype=D)
    assert logprobs_from_logits(two, torch.tensor([[1]])).item() == pytest.approx(-math.log(2))
    assert entropy_from_logits(two).item() == pytest.approx(math.log(2))


def test_position_ids_for_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]])
    assert position_ids_for(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 2], [0, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------------------------
# 8. PolicyWithValueHead alignment
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    return PolicyWithValueHead(model).eval()


def test_value_head_forward_alignment_no_padding(tiny_llama):
    pv = tiny_llama
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 50, (2, 10), generator=g)
    attn = torch.ones_like(ids)
    P = 4
    with torch.no_grad():
        logits, values = pv(ids, attn, position_ids_for(attn), response_start=P)
        full = pv.policy(ids, attention_mask=attn, output_hidden_states=True)
    assert logits.shape == (2, 10 - P, 50) and values.shape == (2, 10 - P)
    # logits at positions P-1 .. T-2 predict the response tokens at P .. T-1
    torch.testing.assert_close(logits, full.logits[:, P - 1 : -1], atol=1e-5, rtol=0)
    # values are read at the same positions as those logits (the last hidden state, after the final norm)
    hidden = full.hidden_states[-1][:, P - 1 : -1]
    torch.testing.assert_close(values, pv.value_head(hidden).squeeze(-1), atol=1e-5, rtol=0)
    # log-prob of token a_t from the logits one position before it
    lp = logprobs_from_logits(logits, ids[:, P:])
    direct = torch.log_softmax(full.logits, -1)[0, P - 1, ids[0, P]]
    assert lp[0, 0].item() == pytest.approx(direct.item(), abs=1e-5)


def test_value_head_forward_left_padded_row_equals_unpadded(tiny_llama):
    pv = tiny_llama
    prompts = [[1, 7, 8, 9, 10], [1, 11, 12]]  # the second is left-padded by 2
    responses = [[20, 21, 22, 2], [30, 31]]  # the second is right-padded by 2 (ended at its EOS... or not)
    # the trainer's own collate (left-padded prompts + right-padded responses)
    fake = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0), accelerator=SimpleNamespace(device="cpu"))
    b = PPOTrainer.collate(fake, [{"input_ids": p} for p in prompts], responses)
    P = b["P"]
    assert P == 5 and b["input_ids"][1].tolist() == [0, 0, 1, 11, 12, 30, 31, 0, 0]
    assert b["position_ids"][1].tolist()[2:7] == [0, 1, 2, 3, 4]
    assert b["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with torch.no_grad():
        logits, values = pv(b["input_ids"], b["attention_mask"], b["position_ids"], P)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            ones = torch.ones_like(ids)
            ref_logits, ref_values = pv(ids, ones, position_ids_for(ones), len(p))
            plain = pv.policy(ids).logits[:, len(p) - 1 : -1]
            n = len(r)
            torch.testing.assert_close(ref_logits, plain, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[row, :n], ref_logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(values[row, :n], ref_values[0], atol=1e-5, rtol=0)


def test_value_head_logprobs_match_generation(tiny_llama):
    """Greedy generation with left padding and the KV cache: its per-step logits are the training logits."""
    pv = tiny_llama
    ids = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = pv.policy.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=4,
                                 min_new_tokens=4, pad_token_id=0, eos_token_id=None, use_cache=True,
                                 output_logits=True, return_dict_in_generate=True)
        seq = out.sequences
        gen_logits = torch.stack(out.logits, 1).float()
        full_attn = torch.cat([attn, torch.ones(2, 4, dtype=attn.dtype)], 1)
        logits, _ = pv(seq, full_attn, position_ids_for(full_attn), ids.shape[1])
    torch.testing.assert_close(logits, gen_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs_from_logits(logits, seq[:, 5:]),
                               logprobs_from_logits(gen_logits, seq[:, 5:]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 9. Gradient accumulation and the DeepSpeed batch fields
# ----------------------------------------------------------------------------------------------------------------


def _hp(**overrides):
    from common.ppo import PPOHyperparameters

    base = dict(batch_size=4, mini_batch_size=1, gradient_accumulation_steps=1, ppo_epochs=2, learning_rate=0.5,
                gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, max_grad_norm=None,
                early_stopping=False, target_kl=1.0, temperature=1.0, output_min_length=4, output_max_length=4,
                generation_batch_size=4, reward_baseline=0.0, reward_normalization="none", reward_clip=None,
                missing_eos_penalty=None, reward_batch_size=4, seed=0)
    return PPOHyperparameters(**{**base, **overrides})


def _updated_weights(mini: int, accumulate: int) -> dict:
    """One `update` (2 epochs over 4 rows) with plain SGD, so a wrongly scaled gradient changes the weights."""
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, pad_token_id=0)
    model = PolicyWithValueHead(LlamaForCausalLM(config))
    hp = _hp(mini_batch_size=mini, gradient_accumulation_steps=accumulate)
    trainer = PPOTrainer(Accelerator(cpu=True), model, SimpleNamespace(pad_token_id=0), None, None, [], hp,
                         FixedKLController(0.1), optimizer=torch.optim.SGD(model.parameters(), lr=hp.learning_rate))
    g = torch.Generator().manual_seed(1)
    prompts = [{"input_ids": torch.randint(3, 50, (n,), generator=g).tolist()} for n in (5, 3, 4, 5)]
    responses = torch.randint(3, 50, (4, 6), generator=g).tolist()  # equal lengths: minibatch means agree
    b = trainer.collate(prompts, responses)
    with torch.no_grad():
        _, old_values, old_logprobs = trainer.forward(model, b)
    advantages = torch.randn(4, 6, generator=g)
    returns = old_values + torch.randn(4, 6, generator=g)
    stats = trainer.update(b, old_logprobs - 0.05, old_values, advantages, returns)
    assert stats["ppo/updates"] == 2 * 4 // (mini * accumulate)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_the_larger_minibatch():
    one = _updated_weights(mini=2, accumulate=1)
    two = _updated_weights(mini=1, accumulate=2)
    start = _updated_weights(mini=4, accumulate=1)  # a different schedule: must differ
    assert any(not torch.allclose(one[k], start[k], atol=1e-4) for k in one)
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=2e-6, rtol=1e-5)


def test_deepspeed_auto_batch_fields_come_from_the_ppo_flags():
    from common.cli import UserError
    from common.ppo import configure_deepspeed

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {}}
    configure_deepspeed(config, _hp(mini_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5))
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    configure_deepspeed(config, _hp(mini_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5))  # agrees
    with pytest.raises(UserError, match="gradient_accumulation_steps 4 but --gradient_accumulation_steps is 8"):
        configure_deepspeed(config, _hp(mini_batch_size=2, gradient_accumulation_steps=8, max_grad_norm=0.5))
