"""The offline tiny-model builder: deterministic, a few million parameters, Llama conventions."""

import hashlib
import os

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
