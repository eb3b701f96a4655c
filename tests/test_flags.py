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
