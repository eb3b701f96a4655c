"""Every stage on tiny random models of eight families: SFT -> merge -> reward model -> merge -> PPO, with LoRA and
with full fine-tuning. At PPO's first step the policy and its reference are the same weights, so the logged KL
must be exactly 0: a log-prob path that differs between rollout, reference and training (a skipped soft-cap, a
wrong position, an EOS list taken half) shows there first."""

import json
import os

import pytest

from common.cli import run
from common.outputs import read_metrics
from conftest import ROOT

FAMILIES = {
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=512),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, sliding_window=64),
    "gemma2": dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                   final_logit_softcapping=2.0,
                   attn_logit_softcapping=50.0, sliding_window=64),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=512, word_embed_proj_dim=16),  # the LM head reads a projection of 16
    "llama_eos_list": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512),
}


def _stage(module_name: str, args: list[str]) -> None:
    import importlib

    module = importlib.import_module(module_name)
    run(lambda: module.main(*module.parse([str(a) for a in args])))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from common.tiny_model import build_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(os.path.join(ROOT, "data"), 1024).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def chain(request, tokenizer_dir, tmp_path_factory):
    """The family's random base, then SFT, merge, reward model and merge, as scripts/run_pipeline.sh chains them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    family = request.param
    root = tmp_path_factory.mktemp(family)
    spec = dict(FAMILIES[family])
    base = root / "base"
    AutoConfig.for_model(spec["model_type"]).save_pretrained(base)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(base)
    # As the stages will load it: a family's tokenizer class may add tokens (Qwen2's adds <|endoftext|>), and the
    # embedding matrix must have a row for each.
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id
    if family == "llama_eos_list":
        eos = [eos, tokenizer.convert_tokens_to_ids(".")]
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer), eos_token_id=eos,
                                  bos_token_id=tokenizer.bos_token_id, pad_token_id=None, tie_word_embeddings=False,
                                  **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    _stage("training_sft", ["--model_name_or_path", base, "--dataset_name", ".", "--subset", "data/finetune",
                            "--size_valid_set", "4", "--seq_length", "64", "--batch_size", "2", "--max_steps", "2",
                            "--eval_freq", "2", "--save_freq", "2", "--learning_rate", "1e-3", "--disable_tqdm", "true",
                            "--output_dir", root / "sft"])
    _stage("merge_with_lora", ["--adapter_model_name", root / "sft", "--output_name", root / "sft_merged"])
    _stage("training_reward_model", ["--model_name_or_path", root / "sft_merged", "--dataset_name", ".",
                                     "--max_length", "512", "--per_device_train_batch_size", "2", "--max_steps", "2",
                                     "--train_subset", "8", "--eval_subset", "8", "--eval_steps", "2",
                                     "--save_steps", "2", "--learning_rate", "1e-3", "--disable_tqdm", "true",
                                     "--output_dir", root / "rm"])
    _stage("merge_with_lora", ["--adapter_model_name", root / "rm", "--output_name", root / "rm_merged"])
    return family, root


@pytest.mark.slow
@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_ppo_starts_at_kl_zero_and_trains(chain, use_peft):
    family, root = chain
    for folder in ("sft", "sft_merged", "rm", "rm_merged"):
        marker = "adapter_config.json" if folder in ("sft", "rm") else "config.json"
        assert os.path.isfile(os.path.join(root, folder, marker))
    out = root / f"ppo_{'lora' if use_peft else 'full'}"
    _stage("training_rl", ["--model_name", root / "sft_merged", "--reward_model_name", root / "rm_merged",
                           "--dataset_name", ".", "--subset", "data/rl", "--batch_size", "4", "--mini_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--ppo_epochs", "1", "--output_min_length", "4",
                           "--output_max_length", "8", "--steps", "8", "--learning_rate", "1e-3",
                           "--use_peft", str(use_peft).lower(), "--save_freq", "1",
                           "--disable_tqdm", "true", "--output_dir", out])
    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["objective/kl"] == 0.0, (family, metrics[0]["objective/kl"])  # policy == reference
    assert metrics[0]["ppo/updates"] == 2 and metrics[1]["objective/kl"] is not None
    assert all(m["skipped_steps"] == 0 for m in metrics)
    marker = "adapter_config.json" if use_peft else "config.json"
    assert os.path.isfile(os.path.join(out, marker)) and os.path.isfile(os.path.join(out, "value_head.safetensors"))
    state = json.load(open(os.path.join(out, "checkpoint-2", "trainer_state.json")))
    assert state["global_step"] == 2
