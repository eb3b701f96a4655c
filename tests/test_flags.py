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
