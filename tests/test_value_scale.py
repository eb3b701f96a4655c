"""Value learning does not depend on the scale of the reward model's scores (docs/ppo.md, detail 25).

The value clip (`--cliprange_value`, absolute) is meaningful only relative to the scale of the returns. With the
default `--reward_normalization running`, scores are standardised before they become rewards, so a reward model
whose logits are 100 times larger gives the same PPO run: same values, same value loss, same clipping. Without
normalisation the same reward model makes the clip bind on many more tokens: the throttling the default avoids.
"""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_ppo import _save_reward_model, ppo

from common.outputs import read_metrics


def _scaled_copy(reward_model: str, out: str, factor: float) -> str:
    """The same reward model with its `score` head (Llama's has no bias) multiplied by ``factor``."""
    import shutil

    shutil.copytree(reward_model, out)
    path = os.path.join(out, "model.safetensors")
    weights = load_file(path)
    (key,) = [k for k in weights if k.startswith("score.")]
    weights[key] = weights[key] * factor
    save_file(weights, path, metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_value_learning_is_the_same_at_any_score_scale_and_the_clip_binds_without_normalisation(tiny_model, tmp_path):
    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"), seed=1)
    rm100 = _scaled_copy(rm, str(tmp_path / "rm100"), 100.0)
    steps = ["--steps", "32", "--save_freq", "1000"]  # 4 PPO steps of 8 episodes
    runs = {}
    for name, model, extra in (("x1", rm, []), ("x100", rm100, []),
                               ("x100, none", rm100, ["--reward_normalization", "none"])):
        out = str(tmp_path / name.replace(", ", "_"))
        ppo(tiny_model, model, out, *steps, *extra)
        runs[name] = (read_metrics(out), load_file(os.path.join(out, "value_head.safetensors")))

    (m1, v1), (m100, v100), (m_none, _) = runs["x1"], runs["x100"], runs["x100, none"]
    raw = [m["objective/scores_std"] for m in m1], [m["objective/scores_std"] for m in m100]
    assert all(abs(b / a - 100) < 0.01 for a, b in zip(*raw)), raw  # the raw scores really are 100 times larger
    for key in ("objective/scores_shaped", "loss/value", "val/mean", "val/explained_variance"):
        a, b = [m[key] for m in m1], [m[key] for m in m100]
        assert all(abs(x - y) < 1e-3 * (1 + abs(x)) for x, y in zip(a, b)), (key, a, b)
    # A clip fraction counts tokens on either side of a threshold: float rounding may move one or two of them.
    a, b = [m["val/clipfrac"] for m in m1], [m["val/clipfrac"] for m in m100]
    assert all(abs(x - y) < 0.02 for x, y in zip(a, b)), (a, b)
    for key in v1:
        assert torch.allclose(v1[key], v100[key], rtol=1e-3, atol=1e-5), key
    assert max(abs(w).max().item() for w in v1.values()) > 0  # the value head did learn something
    # Raw scores 100 times larger, no normalisation: a value may move only 0.2 a step towards returns of that scale,
    # so the clip binds on a much larger share of the tokens than with normalised scores (a few tokens of a small
    # batch make each step's fraction noisy: the comparison is over the whole run).
    clipped, normalised = sum(m["val/clipfrac"] for m in m_none), sum(m["val/clipfrac"] for m in m1)
    assert clipped >= 0.5 and clipped > 2 * normalised, ([m["val/clipfrac"] for m in m_none], normalised)
