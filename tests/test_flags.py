"""Flags that users carry over from StackLLaMA's scripts and older transformers: bare booleans and the renamed
gradient-checkpointing field parse as they did, without a library warning."""

import warnings

import pytest
import yaml

import training_dpo
import training_reward_model
import training_sft

SCRIPTS = [training_sft, training_reward_model, training_dpo]
BASE = ["--model_name_or_path", "m", "--output_dir", "out"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_a_bare_boolean_flag_means_true(script):
    script_args, config = script.parse(BASE + ["--bf16", "--eval_first_step"])[:2]
    assert config.bf16 is True and script_args.eval_first_step is True
    assert script.parse(BASE + ["--bf16", "false"])[1].bf16 is False


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_gradient_checkpointing_sets_the_new_field_without_a_warning(script, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers warns when the old field is set
        on = script.parse(BASE + ["--gradient_checkpointing"])[1]
        off = script.parse(BASE + ["--gradient_checkpointing", "false"])[1]
        default = script.parse(BASE)[1]
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"gradient_checkpointing": True}))
        from_yaml = script.parse(BASE + ["--config", str(path)])[1]
        from_kwargs = script.parse(kwargs={"model_name_or_path": "m", "output_dir": "out",
                                           "gradient_checkpointing": True})[1]
    assert (on.activation_checkpointing, on.gradient_checkpointing) == (True, True)
    assert (off.activation_checkpointing, off.gradient_checkpointing) == (False, False)
    assert default.activation_checkpointing is False  # the CPU default: checkpointing only pays off on a GPU
    assert from_yaml.activation_checkpointing is True and from_kwargs.activation_checkpointing is True


def _record(name, message, level=30):
    import logging

    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_known_library_messages_are_silenced_by_name_and_others_are_not():
    import logging

    import common.quiet  # noqa: F401  (installs the filters)

    def shown(name, message):
        return logging.getLogger(name).filter(_record(name, message))

    assert not shown("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: x")
    assert shown("bitsandbytes.backends.cpu.ops", "some other bitsandbytes warning")
    assert not shown("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    report = ("LlamaForSequenceClassification LOAD REPORT from: m\nKey            | Status     | \n"
              "---------------+------------+-\n{rows}\nNotes:\n- MISSING:\tthose params were newly initialized")
    expected = "lm_head.weight | UNEXPECTED | \nscore.weight   | MISSING    | "
    assert not shown("transformers.modeling_utils", report.format(rows=expected))
    # Anything beyond the new head and the dropped LM head still shows the whole report.
    assert shown("transformers.modeling_utils", report.format(rows=expected + "\nmodel.norm.weight | MISSING | "))
    assert shown("transformers.modeling_utils", report.format(rows="score.weight | MISMATCH | shape"))
    assert shown("transformers.modeling_utils", "LlamaForCausalLM LOAD REPORT from: m\nscore.weight | MISSING |")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        common.quiet.silence_known_noise()  # filterwarnings entries go first, before the "default" above
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("Unable to fetch remote file due to the following error E - silently ignoring the lookup for "
                      "the file config.json in /runs/base.", stacklevel=1)
        warnings.warn("Unable to fetch remote file due to the following error E - silently ignoring the lookup for "
                      "the file config.json in meta-llama/Llama-2-7b-hf.", stacklevel=1)
        warnings.warn("`other_field` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
    assert [str(w.message)[:40] for w in caught] == ["Unable to fetch remote file due to the f",
                                                     "`other_field` is deprecated and will be "]


@pytest.mark.parametrize("script", ["training_sft", "training_reward_model", "training_dpo", "training_rl",
                                    "merge_with_lora", "evaluate"])
def test_help_keeps_the_docstrings_lines_and_prints_no_library_message(script):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, f"{script}.py", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=__import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    doc = __import__(script).__doc__
    commands = [line for line in doc.splitlines() if line.strip().startswith("python ")]
    assert commands and all(line in out.stdout for line in commands)  # each command line as written


# ------------------------------------------------------------------------------------------ every flag (issue 27.6)
# scripts/audit_flags.py runs every flag of every script (docs/flags.md); the tests run its cheap part for every flag
# and check each flag it found broken gives one line now.

def test_every_flag_parses_or_is_refused_with_one_line(tmp_path):
    """Every flag of every script's --help, with the audit's values: parse + the script's argument checks either
    pass or give one `error:` line naming the flag; never a traceback, an anonymous or a multi-line error. (A
    subprocess: some values set process-wide state while parsing, e.g. --fp16's ACCELERATE_MIXED_PRECISION.)"""
    import json
    import os
    import subprocess
    import sys

    import common.cli  # noqa: F401
    from scripts import audit_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "parse.json"
    proc = subprocess.run([sys.executable, "scripts/audit_flags.py", "--parse_only", "--json", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    results = json.loads(out.read_text())["parse_only"]
    broken = [f"{r['script']} {r['flag']} {r['value']}: {r['reason']}" for r in results if r["status"] == "broken"]
    assert not broken and proc.returncode == 0, "\n".join(broken) or proc.stderr[-3000:]
    for script in audit_flags.SCRIPTS:  # every flag of the parser was audited
        parser, _ = audit_flags.script_parser(__import__(script))
        flags = {audit_flags.flag_name(a) for a in audit_flags.flag_actions(parser)}
        assert flags == {r["flag"] for r in results if r["script"] == script}, script
    refused = {(r["script"], r["flag"]) for r in results if r["status"] == "refused"}
    assert ("training_sft", "--report_to") in refused and ("training_dpo", "--loss_type") in refused


def test_the_audit_runs_its_base_commands_and_a_flag(tmp_path):
    """The audit's run mode end to end on one flag: its base commands still parse (a renamed flag stops it with
    one line), the base run of each stage builds the fixtures, and a run is classified."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, "scripts/audit_flags.py", "--scripts", "training_rl", "--flags", "seed",
                           "--work_dir", str(tmp_path / "work"), "--json", str(out)], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["flag"], r["value"], r["status"]) for r in runs] == [("--seed", "1", "works")], runs


@pytest.fixture
def restored_environ():
    """Parsing a TrainingArguments may set environment variables (accelerate's); later tests must not see them."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _one_line_error(capsys, script: str, args: list[str], *needles: str) -> str:
    """``script``'s main through common.cli.run, as the command line runs it: exit 2 and one `error:` line."""
    import importlib

    from common.cli import run

    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: module.main(*module.parse(args)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


TINY = "assets/tiny-pretrained"


def _fixed_cases():
    """(script, flags, words the error line names): each flag the audit found broken before its fix."""
    import torch

    sft = ["--model_name_or_path", TINY, "--dataset_name", ".", "--subset", "data/finetune", "--size_valid_set", "2",
           "--seq_length", "64", "--max_steps", "1"]
    pairs = ["--model_name_or_path", TINY, "--dataset_name", ".", "--train_subset", "4", "--eval_subset", "2",
             "--max_steps", "1"]
    cases = [
        ("training_sft", ["--report_to", "wandb"], ["--report_to wandb", "not installed"]),
        ("training_sft", ["--report_to", "no_such_tracker"], ["--report_to no_such_tracker", "not a tracker"]),
        ("training_sft", ["--optim", "galore_adamw"], ["--optim galore_adamw", "galore"]),
        ("training_sft", ["--optim_args", "betas=(0.9,0.99)"], ["--optim_args", "key=value"]),
        ("training_sft", ["--lr_scheduler_type", "cosine_with_min_lr"],
         ["cosine_with_min_lr", "--lr_scheduler_kwargs"]),
        ("training_reward_model", ["--lr_scheduler_kwargs", '{"num_cycles": 1}'], ["--lr_scheduler_kwargs"]),
        ("training_sft", ["--use_liger_kernel"], ["--use_liger_kernel"]),
        ("training_sft", ["--save_strategy", "best"], ["--save_strategy best", "--metric_for_best_model"]),
        ("training_sft", ["--push_to_hub"], ["--push_to_hub", "HF_HUB_OFFLINE"]),  # the tests run offline
        ("merge_with_lora", ["--adapter_model_name", "a", "--output_name", "o", "--push_to_hub"], ["--push_to_hub"]),
        ("training_sft", ["--fsdp", "full_shard"], ["--fsdp", "launcher"]),
        ("training_sft", ["--deepspeed", "configs/no_such.json"], ["--deepspeed", "no such file"]),
        ("training_sft", ["--ddp_backend", "gloo"], ["--ddp_backend gloo", "launcher"]),
        ("training_sft", ["--dataset_kwargs", '{"skip_prepare_dataset": true}'], ["--dataset_kwargs"]),
        ("training_reward_model", ["--train_sampling_strategy", "group_by_length"], ["--train_sampling_strategy"]),
        ("training_dpo", ["--train_sampling_strategy", "batch_rebalance"], ["--train_sampling_strategy"]),
        ("training_dpo", ["--loss_type", "no_such_loss"], ["--loss_type no_such_loss", "sigmoid"]),
        ("training_dpo", ["--f_divergence_type", "no_such"], ["--f_divergence_type no_such", "reverse_kl"]),
        ("training_rl", ["--model_name", "m", "--reward_model_name", "r", "--report_to", "tensorboard,wandb"],
         ["--report_to tensorboard, wandb", "not installed"]),
        ("training_rl", ["--model_name", "m", "--reward_model_name", "r", "--lr_scheduler_type", "no_such"],
         ["--lr_scheduler_type no_such"]),
        ("training_sft", sft + ["--eos_token", "<no_such_token>"], ["--eos_token", "not a token"]),
        ("training_sft", sft + ["--eos_token_id", "99999"], ["--eos_token_id 99999"]),
        ("training_sft", sft + ["--chat_template_path", TINY], ["--chat_template_path", ".jinja"]),
        ("training_sft", sft + ["--lora_task_type", "SEQ_CLS"], ["--lora_task_type SEQ_CLS", "CAUSAL_LM"]),
        ("training_sft", sft + ["--router_aux_loss_coef", "0.01"], ["router_aux_loss_coef"]),
        ("training_sft", sft + ["--lora_target_parameters", "mlp.up_proj.weight"],
         ["--lora_target_parameters mlp.up_proj.weight", "--lora_target_modules"]),
        ("training_dpo", pairs + ["--sync_ref_model"], ["sync_ref_model"]),
    ]
    if not torch.cuda.is_available():
        cases += [("training_sft", ["--activation_offloading"], ["--activation_offloading", "GPU"]),
                  ("training_reward_model", ["--fp16"], ["--fp16", "--bf16"]),
                  ("training_rl", ["--model_name", "m", "--reward_model_name", "r", "--attn_implementation",
                                   "flex_attention"], ["--attn_implementation flex_attention", "CPU"])]
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        cases.append(("training_dpo", ["--attn_implementation", "flash_attention_2"], ["flash_attention_2"]))
    return cases


@pytest.mark.parametrize("script, args, needles", _fixed_cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_flag_fixed_by_the_audit_gives_one_line(script, args, needles, capsys, restored_environ, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(__import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    if script != "merge_with_lora" and "--output_dir" not in args:
        args = args + ["--output_dir", str(tmp_path / "out")]
    if script in ("training_sft", "training_reward_model", "training_dpo") and "--model_name_or_path" not in args:
        args = ["--model_name_or_path", "m"] + args
    _one_line_error(capsys, script, args, *needles)


def test_a_checkpoint_of_another_stage_is_refused(tmp_path):
    import json

    from common.checkpoints import check_origin
    from common.errors import UserError

    fingerprint = {"digest": "d", "architecture": {}}
    (tmp_path / "origin.json").write_text(json.dumps({"stage": "SFT", "base_model": "m", "fingerprint": fingerprint}))
    with pytest.raises(UserError, match="of the SFT stage, not of reward model; pass --resume_from_checkpoint"):
        check_origin(str(tmp_path), {"stage": "reward model", "base_model": "m", "fingerprint": fingerprint})
    assert check_origin(str(tmp_path), {"stage": "SFT", "base_model": "m", "fingerprint": fingerprint}) is None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_flags_typed_as_mappings_objects_or_words_parse_from_the_command_line(script, restored_environ):
    config = script.parse(BASE + ["--liger_kernel_config", '{"rope": true}', "--include_num_input_tokens_seen",
                                  "non_padding", "--parallelism_config", '{"dp_shard_size": 1}'])[1]
    assert config.liger_kernel_config == {"rope": True} and config.include_num_input_tokens_seen == "non_padding"
    assert config.parallelism_config.dp_shard_size == 1
    from common.errors import UserError

    with pytest.raises(UserError, match="--liger_kernel_config.*JSON object"):
        script.parse(BASE + ["--liger_kernel_config", "rope"])


def test_lora_flags_reach_the_adapter_and_4bit_storage_the_quantization():
    from common.modeling import ModelArguments, lora_config, quantization_config

    args = ModelArguments(model_name_or_path="m", lora_target_parameters=["mlp.up_proj.weight"],
                          lora_task_type="SEQ_CLS", load_in_4bit=True, bnb_4bit_quant_storage="bfloat16")
    assert lora_config(args, "SEQ_CLS").target_parameters == ["mlp.up_proj.weight"]
    import torch

    assert quantization_config(args, torch.float32).bnb_4bit_quant_storage == torch.bfloat16


def test_the_plain_lm_head_gives_the_log_sum_of_squared_probabilities_dpo_weighting_reads():
    """--use_weighting (DPO's WPO weights) reads log(sum_v p_v^2) from the LM head: the plain head computes it as
    TRL's fused head does."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from common.modeling import plain_lm_head

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    fused = LlamaForCausalLM(config)
    plain = copy.deepcopy(fused)
    add_fused_lm_head(fused, outputs=("log_probs", "log_sum_sq_probs"))
    add_fused_lm_head(plain, outputs=("log_probs", "log_sum_sq_probs"))
    assert plain_lm_head(plain)
    ids = torch.randint(0, 64, (2, 9))
    a = fused(input_ids=ids, labels=ids, fused_lm_head=True)
    b = plain(input_ids=ids, labels=ids, fused_lm_head=True)
    assert torch.allclose(a.log_sum_sq_probs, b.log_sum_sq_probs, atol=1e-5)
