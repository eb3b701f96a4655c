"""The offline tiny-model builder: deterministic, a few million parameters, Llama conventions."""

import hashlib
import os

import pytest
import torch

from common.tiny_model import main


def _digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def test_builder_is_deterministic_and_loads(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = main(["--output_dir", str(tmp_path / "again")])
    assert _digest(tiny_model) == _digest(again)
    assert "model.safetensors" in os.listdir(tiny_model)

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    n_params = sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "llama" and 1e6 < n_params < 10e6
    assert tok.pad_token is None and tok.eos_token == "</s>"  # like Llama: the loaders must set a pad token
    ids = tok("Question: How do I merge two dicts in Python?")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) < 20  # trained on the sample data: words are few tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


# Held-out loss (nats per token) of the committed pretrained base on the first 16 evaluation examples: measured
# 0.234 over question + answer + </s> and 0.171 over the answer + </s> (the 1-epoch variant: 0.284 / 0.223; the
# random tiny model: 7.67 / 7.66). The bound leaves a margin for other CPUs and library versions.
PRETRAINED_HELDOUT_MAX = 0.35


def test_pretrained_copies_the_committed_base_and_it_predicts_held_out_answers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tiny_model import DATA_DIR, PRETRAINED_DIR, WEIGHT_FILES, heldout_examples, heldout_loss

    out = main(["--pretrained", "--output_dir", str(tmp_path / "base")])
    committed = {f: d for f, d in _digest(PRETRAINED_DIR).items() if f in WEIGHT_FILES}
    assert set(committed) == set(WEIGHT_FILES)
    assert _digest(out) == committed

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is None and tok.eos_token == "</s>"
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    loss, answer_loss = heldout_loss(model, tok, heldout_examples(DATA_DIR)[:16])
    assert loss < PRETRAINED_HELDOUT_MAX and answer_loss < PRETRAINED_HELDOUT_MAX, (loss, answer_loss)


def test_pack_keeps_documents_whole_and_in_order():
    from common.tiny_model import pack

    docs = [[i] * n for i, n in enumerate([300, 150, 250, 100, 500, 600, 40])]
    blocks = pack(docs, 512, window=2)
    assert all(len(b) <= 512 for b in blocks)
    assert [sorted(set(b)) for b in blocks] == [[0, 1], [2, 3], [4], [5], [6]]
    assert blocks[3] == [5] * 512  # longer than a block: cut


@pytest.mark.slow
def test_pretraining_is_deterministic(tmp_path):
    from common.tiny_model import pretrain

    kwargs = {"block_size": 256, "batch_size": 2, "max_steps": 3, "eval_every": 0, "heldout_n": 8}
    first = pretrain(str(tmp_path / "a"), **kwargs)
    second = pretrain(str(tmp_path / "b"), **kwargs)
    digests = [{f: d for f, d in _digest(tmp_path / x).items() if f != "pretrain_stats.json"} for x in "ab"]
    assert digests[0] == digests[1] and first["heldout_loss"] == second["heldout_loss"]
    assert first["heldout_loss"] < 7.6  # three steps already move it off the random model's loss
