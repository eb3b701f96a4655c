"""Stage 1 end to end on the tiny model: learning, outputs, flags, config files, resume, and bad input."""

import json
import os

import pytest
import torch
import yaml

from common.outputs import read_metrics
from conftest import assert_user_error, run_script

DATA = ["--dataset_name", ".", "--subset", "data/finetune"]
FAST = ["--seq_length", "128", "--batch_size", "4", "--size_valid_set", "40", "--num_warmup_steps", "1",
        "--learning_rate", "3e-3", "--disable_tqdm", "true"]


def sft(tiny_model, out, *extra, check=True):
    return run_script("training_sft.py", "--model_name_or_path", tiny_model, *DATA, *FAST, "--output_dir", out,
                      *extra, check=check)


@pytest.mark.slow
def test_sft_learns_and_writes_a_complete_output_folder(tiny_model, tmp_path):
    out = str(tmp_path / "sft")
    # The tiny model's head is random and frozen under plain LoRA, which caps what LoRA can learn in 60 steps;
    # training the head too (as `modules_to_save`) lets a random model show real learning. Real models don't need it.
    sft(tiny_model, out, "--max_steps", "80", "--batch_size", "8", "--eval_freq", "40", "--save_freq", "40",
        "--learning_rate", "5e-3", "--lora_modules_to_save", "lm_head", "--eval_first_step", "true")
    metrics = read_metrics(out)
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, 81))
    losses = [m["loss"] for m in metrics if "loss" in m]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss fell only from {first:.3f} to {last:.3f}"
    evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    assert set(evals) == {0, 40, 80} and evals[80] < 0.85 * evals[0]
    assert all("learning_rate" in m for m in metrics if "loss" in m)

    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run_args.yaml",
            "metrics.jsonl", "README.md", "checkpoint-40", "checkpoint-80"} <= files
    assert "training_args.bin" not in files and not any(f.startswith(".final-tmp") for f in files)
    args = yaml.safe_load(open(os.path.join(out, "run_args.yaml")))
    assert args["SFTConfig"]["max_steps"] == 80 and args["ModelArguments"]["model_name_or_path"] == tiny_model
    card = open(os.path.join(out, "README.md")).read()
    assert "SFT" in card and tiny_model in card and "training_sft.py" in card and "eval_loss_last" in card

    # The adapter loads with plain peft and changes what the model predicts.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("Question: How do I reverse a list in Python?\n\nAnswer: ")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out)
        tuned_logits = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-2


@pytest.mark.slow
def test_stackllama_command_and_flags_run_unchanged(tiny_model, tmp_path):
    out = str(tmp_path / "llama-se")
    proc = run_script(
        "training_sft.py", f"--model_path={tiny_model}", "--streaming", "--learning_rate", "1e-5", "--max_steps", "4",
        "--output_dir", out, *DATA, "--split", "train", "--size_valid_set", "20", "--shuffle_buffer", "100",
        "--seq_length", "128", "--batch_size", "2", "--gradient_accumulation_steps", "2", "--eos_token_id", "2",
        "--lr_scheduler_type", "cosine", "--num_warmup_steps", "1", "--weight_decay", "0.05", "--local_rank", "-1",
        "--bf16", "false", "--gradient_checkpointing", "false", "--seed", "0", "--num_workers", "0",
        "--log_freq", "1", "--eval_freq", "2", "--save_freq", "2", "--disable_tqdm", "true",
    )
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {m["step"] for m in metrics if "eval_loss" in m} == {2, 4}
    args = yaml.safe_load(open(os.path.join(out, "run_args.yaml")))
    cfg = args["SFTConfig"]
    assert (cfg["max_length"], cfg["per_device_train_batch_size"], cfg["warmup_steps"],
            cfg["save_steps"]) == (128, 2, 1, 2)
    assert args["ScriptArguments"]["streaming"] is True and args["ScriptArguments"]["eos_token_id"] == 2
    assert os.path.isdir(os.path.join(out, "checkpoint-4")) and "saved to" in proc.stdout


def test_help_lists_hf_names_and_stackllama_aliases():
    out = run_script("training_sft.py", "--help").stdout
    for flag in ["--model_name_or_path", "--model_path", "--max_length", "--seq_length", "--batch_size",
                 "--per_device_train_batch_size", "--size_valid_set", "--streaming", "--completion_only_loss",
                 "--use_peft", "--lora_r", "--load_in_4bit", "--config", "--resume_from_checkpoint"]:
        assert flag in out, flag


@pytest.mark.slow
def test_config_yaml_with_command_line_override_and_refusal_to_overwrite(tiny_model, tmp_path, capsys):
    from test_bad_input import _expect_error

    out = str(tmp_path / "sft")
    config = tmp_path / "run.yaml"
    # YAML keys may be Hugging Face names or StackLLaMA aliases.
    config.write_text(yaml.safe_dump({"model_path": tiny_model, "dataset_name": ".", "subset": "data/finetune",
                                      "max_steps": 5, "seq_length": 64, "learning_rate": 2e-3, "output_dir": out,
                                      "size_valid_set": 10, "batch_size": 2, "save_freq": 100, "disable_tqdm": True}))
    run_script("training_sft.py", "--config", str(config), "--max_steps", "3")
    args = yaml.safe_load(open(os.path.join(out, "run_args.yaml")))
    assert args["SFTConfig"]["max_steps"] == 3 and args["SFTConfig"]["max_length"] == 64
    assert args["SFTConfig"]["learning_rate"] == 2e-3
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]

    before = open(os.path.join(out, "adapter_model.safetensors"), "rb").read()
    _expect_error(capsys, "training_sft", ["--config", str(config)], "--output_dir", "--overwrite_output_dir")
    assert open(os.path.join(out, "adapter_model.safetensors"), "rb").read() == before  # nothing lost
    run_script("training_sft.py", "--config", str(config), "--overwrite_output_dir", "--max_steps", "2")
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_bad_data_is_reported_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "response_j": "a"}) + "\n"
                   + json.dumps({"question": "q2", "answer": "b"}) + "\n")
    proc = run_script("training_sft.py", "--model_name_or_path", "does/not-exist-locally", "--dataset_name", str(bad),
                      "--output_dir", str(tmp_path / "o"), check=False)
    assert_user_error(proc, str(bad), "row 2", "response_j")


@pytest.mark.parametrize("flags, needle", [
    (["--learning_rate", "0"], "--learning_rate"),
    (["--max_steps", "0"], "--max_steps"),
    (["--seq_length", "-5"], "--seq_length"),
    (["--size_valid_set", "5000"], "--size_valid_set"),
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit"),
    (["--model_name_or_path", "./no/such/folder"], "./no/such/folder"),
])
def test_bad_flags_give_one_clear_message(tiny_model, tmp_path, capsys, flags, needle):
    import training_sft
    from common.cli import run

    args = ["--model_name_or_path", tiny_model, *DATA, "--output_dir", str(tmp_path / "o"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: training_sft.main(*training_sft.parse(args)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and needle in err[err.index("error: "):], err
    assert not os.path.exists(tmp_path / "o" / "adapter_config.json")


def test_a_bad_flag_exits_without_traceback(tmp_path):
    proc = run_script("training_sft.py", "--model_path", "m", "--learning_rate", "-1", "--output_dir", str(tmp_path),
                      check=False)
    assert_user_error(proc, "--learning_rate")


def test_plain_lm_head_matches_trls_fused_head(tiny_model):
    """The CPU head (`--lm_head plain`, the default on CPU) returns what TRL's fused head does: the same loss,
    per-token log-probs, entropy, mean logits and top-1 flags, and the same LoRA gradients."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from common.modeling import plain_lm_head

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    models = []
    for plain in (False, True):
        m = copy.deepcopy(base)
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        if plain:
            assert plain_lm_head(m)
        peft = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
        models.append(peft)
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, base.config.vocab_size, (3, 40))
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt
    labels[2, 30:] = -100  # padding
    outs = []
    for m in models:
        out = m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        outs.append((out, grads))
    (fused, g_fused), (plain, g_plain) = outs
    assert torch.allclose(fused.loss, plain.loss, atol=1e-5)
    assert fused.loss.item() > 1.0  # random weights: a real loss, not a zero from an empty mask
    assert torch.equal(fused.label_mask, plain.label_mask)
    assert torch.allclose(fused.log_probs, plain.log_probs, atol=1e-5)
    assert torch.allclose(fused.entropy, plain.entropy, atol=1e-4)
    assert torch.allclose(fused.mean_logits, plain.mean_logits, atol=1e-5) and fused.mean_logits.abs().sum() > 0
    assert torch.equal(fused.is_top1, plain.is_top1)
    assert len(g_fused) == 2 * 2 * base.config.num_hidden_layers
    for name, g in g_fused.items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(g, g_plain[name], atol=1e-6, rtol=1e-4), name
    # Generation and plain forwards still go through the model's own head.
    logits = models[1](input_ids=ids).logits
    assert logits.shape == (3, 40, base.config.vocab_size)
