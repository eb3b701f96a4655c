"""The stages called from Python, as a notebook calls them: ``run_sft``, ``run_merge``, ``run_reward_model``,
``run_rl``, ``run_dpo`` and ``run_evaluate`` take the flags as keyword arguments, return the output folder and the
final metrics, raise ``UserError`` for a mistake, and leave nothing behind that a second call would trip on."""

import dataclasses
import json
import logging
import os
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.cli import StageResult, UserError
from common.outputs import read_metrics

SFT = {"dataset_name": ".", "size_valid_set": 20, "seq_length": 64, "max_steps": 3, "eval_freq": 3, "save_freq": 3,
       "log_freq": 1}
PAIRS = {"dataset_name": ".", "train_subset": 32, "eval_subset": 16, "max_length": 512, "max_steps": 3,
         "per_device_train_batch_size": 4, "eval_steps": 3, "save_steps": 3, "logging_steps": 1}
RL = {"dataset_name": ".", "subset": "data/rl", "steps": 16, "batch_size": 8, "mini_batch_size": 4,
      "gradient_accumulation_steps": 1, "output_min_length": 6, "output_max_length": 12, "eval_freq": 1,
      "eval_prompts": 8, "disable_tqdm": True}


def global_state() -> dict:
    """What a stage could leave changed for the next call in the same process."""
    return {
        "environ": dict(os.environ),
        "process_group": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "root_handlers": list(logging.getLogger().handlers),
        "transformers_handlers": list(logging.getLogger("transformers").handlers),
        "threads": torch.get_num_threads(),
        "dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "argv": list(sys.argv),
    }


def weights(folder: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, name))


@pytest.mark.slow
def test_every_stage_runs_from_python_back_to_back_and_twice(tiny_model, tmp_path, monkeypatch):
    from evaluate import run_evaluate
    from merge_with_lora import run_merge
    from training_dpo import run_dpo
    from training_reward_model import run_reward_model
    from training_rl import run_rl
    from training_sft import run_sft

    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])  # as in a notebook
    before = global_state()
    out = tmp_path
    # StackLLaMA's --model_path spelling, as a keyword
    sft = run_sft(model_path=tiny_model, output_dir=str(out / "sft"), **SFT)
    assert isinstance(sft, StageResult) and sft.output_dir == str(out / "sft")
    assert os.path.isfile(out / "sft" / "adapter_model.safetensors")
    losses = [m["loss"] for m in read_metrics(sft.output_dir) if "loss" in m]
    assert sft.metrics["steps"] == 3 and sft.metrics["train_loss_last"] == pytest.approx(losses[-1])
    # the call, not the kernel's argv, is what the folder records as its command
    run_args = yaml.safe_load((out / "sft" / "run_args.yaml").read_text())
    assert run_args["command"].startswith("training_sft.run_sft(model_path=") and "max_steps=3" in run_args["command"]
    assert "ipykernel" not in (out / "sft" / "README.md").read_text()

    merged = run_merge(adapter_model_name=sft.output_dir, output_name=str(out / "sft_merged"))
    assert merged.output_dir == str(out / "sft_merged") and os.path.isfile(out / "sft_merged" / "config.json")
    assert merged.metrics["verify_max_abs_diff"] <= merged.metrics["verify_tolerance"]

    rm = run_reward_model(model_name=merged.output_dir, output_dir=str(out / "rm"), **PAIRS)
    report = json.loads((out / "rm" / "eval_report.json").read_text())
    assert rm.metrics["steps"] == 3 and rm.metrics["eval_accuracy"] == report["accuracy"]
    rm_merged = run_merge(adapter_model_name=rm.output_dir, output_name=str(out / "rm_merged"))

    ppo = run_rl(model_name=merged.output_dir, reward_model_name=rm_merged.output_dir, output_dir=str(out / "ppo"),
                 **RL)
    steps = [m for m in read_metrics(ppo.output_dir) if "objective/scores" in m]
    held_out = [m for m in read_metrics(ppo.output_dir) if "eval/rm_score" in m]
    assert ppo.metrics["ppo_steps"] == len(steps) == 2 and ppo.metrics["episodes"] == 16
    assert ppo.metrics["kl_last"] == steps[-1]["objective/kl"]
    assert ppo.metrics["eval_rm_score_first"] == held_out[0]["eval/rm_score"] and held_out[0]["step"] == 0
    assert ppo.metrics["eval_gold_last"] == held_out[-1]["eval/gold"] is not None

    dpo = run_dpo(model_name_or_path=merged.output_dir, output_dir=str(out / "dpo"), **PAIRS)
    assert dpo.metrics["steps"] == 3 and os.path.isfile(out / "dpo" / "adapter_model.safetensors")
    assert dpo.metrics["train_loss_first"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy = reference at first

    final = run_merge(adapter_model_name=ppo.output_dir, output_name=str(out / "final"))
    ev = run_evaluate(models={"sft": merged.output_dir, "final": final.output_dir},
                      reward_model_name=rm_merged.output_dir, num_prompts=8, max_new_tokens=12, best_of_n=4,
                      best_of_n_prompts=4, disable_tqdm=True, output_dir=str(out / "eval"))
    on_disk = json.loads((out / "eval" / "eval.json").read_text())
    assert ev.results == on_disk and set(ev.metrics) == {"sft", "final"}
    assert ev.metrics["final"]["reward"] == on_disk["models"]["final"]["reward"]["mean"]
    assert ev.metrics["sft"]["kl"] == 0.0 and ev.metrics["sft"]["win_rate_gold"] == 0.5  # the baseline itself

    # The same stage again in this process: the same result, so nothing the first calls left behind (seeds,
    # accelerate's state, the process group) changed it.
    again = run_sft(model_path=tiny_model, output_dir=str(out / "sft_again"), **SFT)
    assert again.metrics == sft.metrics
    first, second = weights(sft.output_dir, "adapter_model.safetensors"), weights(again.output_dir,
                                                                                   "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    ppo_again = run_rl(model_name=merged.output_dir, reward_model_name=rm_merged.output_dir,
                       output_dir=str(out / "ppo_again"), **RL)
    assert ppo_again.metrics == ppo.metrics
    first, second = (weights(d, "adapter_model.safetensors") for d in (ppo.output_dir, ppo_again.output_dir))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert global_state() == before


def test_a_mistake_raises_user_error_naming_the_argument_and_writes_nothing(tiny_model, tmp_path):
    from evaluate import run_evaluate
    from merge_with_lora import run_merge
    from training_dpo import run_dpo
    from training_reward_model import run_reward_model
    from training_rl import run_rl
    from training_sft import run_sft

    out = str(tmp_path / "out")
    cases = [
        (lambda: run_sft(model_name_or_path=tiny_model, learning_rate="fast", output_dir=out, **SFT),
         "--learning_rate", "'fast'"),
        (lambda: run_sft(model_name_or_path=tiny_model, lerning_rate=1e-4, output_dir=out), "'lerning_rate'"),
        (lambda: run_reward_model(model_name=str(tmp_path / "missing"), output_dir=out), "missing"),
        (lambda: run_rl(model_name=tiny_model, reward_model_name=tiny_model, batch_size=[8, 16], output_dir=out),
         "batch_size takes one value"),
        (lambda: run_rl(model_name=tiny_model, reward_model_name=tiny_model, batch_size=6, mini_batch_size=4,
                        output_dir=out), "--batch_size"),
        (lambda: run_dpo(model_name_or_path=tiny_model, beta=-1, output_dir=out, **PAIRS), "--beta"),
        (lambda: run_merge(adapter_model_name=str(tmp_path / "no_adapter"), output_name=out), "no_adapter"),
        (lambda: run_evaluate(models={"a": tiny_model}, output_dir=out), "--reward_model_name"),
    ]
    for call, *needles in cases:
        with pytest.raises(UserError) as error:  # an exception the caller can catch, never SystemExit
            call()
        for needle in needles:
            assert needle in str(error.value), (needle, str(error.value))
        assert not os.path.exists(out)  # refused before anything was written
    # --output_dir naming a file: refused by name, the file kept
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(UserError, match="--output_dir"):
        run_sft(model_name_or_path=tiny_model, output_dir=str(tmp_path / "a_file"), **SFT)
    assert (tmp_path / "a_file").read_text() == "keep"


@pytest.mark.parametrize("module, kwargs, argv", [
    ("training_sft", {"model_path": "m", "learning_rate": 1e-4, "streaming": True, "eos_token_id": None,
                      "lr_scheduler_type": "cosine", "warmup_steps": 5},
     ["--model_path", "m", "--learning_rate", "1e-4", "--streaming", "--lr_scheduler_type", "cosine",
      "--warmup_steps", "5"]),
    ("training_reward_model", {"model_name": "m", "use_peft": False, "train_subset": 100, "max_length": 256},
     ["--model_name", "m", "--use_peft", "false", "--train_subset", "100", "--max_length", "256"]),
    ("training_rl", {"model_name": "m", "reward_model_name": "r", "algorithm": "grpo", "num_generations": 4,
                     "cliprange_value": None, "log_with": "none", "init_kl_coef": 0.05},
     ["--model_name", "m", "--reward_model_name", "r", "--algorithm", "grpo", "--num_generations", "4",
      "--cliprange_value", "None", "--log_with", "none", "--init_kl_coef", "0.05"]),
    ("training_dpo", {"model_name_or_path": "m", "loss_type": ["sigmoid", "sft"], "beta": 0.2},
     ["--model_name_or_path", "m", "--loss_type", "sigmoid", "sft", "--beta", "0.2"]),
    ("merge_with_lora", {"adapter_model_name": "a", "base_model_name": "b", "output_name": "o", "verify": False},
     ["--adapter_model_name", "a", "--base_model_name", "b", "--output_name", "o", "--verify", "false"]),
    ("evaluate", {"models": {"sft": "x", "final": "y"}, "num_prompts": 5, "baseline": None},
     ["--models", "sft=x", "final=y", "--num_prompts", "5"]),
])
def test_keyword_arguments_parse_as_the_flags_do(module, kwargs, argv, monkeypatch):
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])  # never read by an entry
    from_kwargs, from_flags = mod.parse(kwargs=kwargs), mod.parse(argv)
    for a, b in zip(from_kwargs, from_flags):
        assert type(a) is type(b)
        differ = {f.name for f in dataclasses.fields(b) if getattr(a, f.name) != getattr(b, f.name)}
        assert not differ, {k: (getattr(a, k), getattr(b, k)) for k in differ}


def test_keywords_override_a_yaml_config_and_none_overrides_it_too(tmp_path):
    import training_rl

    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({"model_name": "m", "steps": 64, "cliprange_value": 0.5, "reward_clip": 3.0}))
    a, c, m = training_rl.parse(kwargs={"config": str(config), "steps": 32, "cliprange_value": None})
    assert (m.model_name_or_path, c.steps, c.cliprange_value, c.reward_clip) == ("m", 32, None, 3.0)
    with pytest.raises(UserError, match="unknown key"):
        config.write_text(yaml.safe_dump({"stepz": 1}))
        training_rl.parse(kwargs={"config": str(config)})
