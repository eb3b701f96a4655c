"""Bad input across the scripts: each case exits 2 with one `error:` message naming the flag, file, row or field,
and writes nothing. (More cases: test_data.py, and the bad-flag tests of each stage's test file.)"""

import json
import os

import pytest
import yaml

from common.cli import run


def _main(script: str, args: list[str]):
    import importlib

    module = importlib.import_module(script)
    return lambda: module.main(*module.parse(args))


def _expect_error(capsys, script, args, *needles):
    with pytest.raises(SystemExit) as exit_info:
        run(_main(script, args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: " in err, err
    message = err[err.index("error: "):]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.fixture
def bad_rows(tmp_path):
    def write(rows):
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)
    return write


GOOD = {"question": "How?", "response_j": "Like this: `x`.", "response_k": "No idea."}


@pytest.mark.parametrize("script, fields", [("training_sft", ["question", "response_j"]),
                                            ("training_reward_model", ["question", "response_j", "response_k"]),
                                            ("training_rl", ["question"]),
                                            ("training_dpo", ["question", "response_j", "response_k"])])
@pytest.mark.parametrize("problem", ["missing", "null", "number", "empty"])
def test_each_stage_names_the_bad_field_and_row(script, fields, problem, bad_rows, tmp_path, capsys, tiny_model):
    field = fields[-1]
    bad = dict(GOOD)
    if problem == "missing":
        bad.pop(field)
    else:
        bad[field] = {"null": None, "number": 7, "empty": "  "}[problem]
    path = bad_rows([GOOD, GOOD, bad])
    data = {"training_sft": ["--dataset_name", path, "--subset", ""],
            "training_reward_model": ["--dataset_name", path, "--train_data_dir", "", "--eval_data_dir", ""],
            "training_dpo": ["--dataset_name", path, "--train_data_dir", "", "--eval_data_dir", ""],
            "training_rl": ["--dataset_name", path, "--subset", "", "--reward_model_name", tiny_model,
                            "--batch_size", "1", "--mini_batch_size", "1",
                            "--gradient_accumulation_steps", "1"]}[script]
    args = ["--model_name_or_path", tiny_model, *data, "--output_dir", str(tmp_path / "out")]
    needles = [repr(field)] + ([] if problem == "missing" else [path, "row 3"])
    _expect_error(capsys, script, args, *needles)
    assert not os.path.exists(tmp_path / "out" / "adapter_config.json")


def test_unknown_key_in_a_yaml_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 1e-4, "lerning_rate": 3}))
    _expect_error(capsys, "training_sft", ["--config", str(config)], "lerning_rate", str(config))


def test_unknown_flag(capsys):
    _expect_error(capsys, "training_rl", ["--model_name", "m", "--ppo_epoch", "3"], "--ppo_epoch")


def test_a_model_path_that_does_not_exist(tmp_path, capsys):
    _expect_error(capsys, "training_reward_model", ["--model_name", str(tmp_path / "nope"), "--dataset_name", "."],
                  str(tmp_path / "nope"))


def test_an_sft_adapter_given_as_reward_model(tiny_model, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = str(tmp_path / "sft_adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(task_type="CAUSAL_LM", r=2)).save_pretrained(adapter)
    args = ["--model_name", tiny_model, "--reward_model_name", adapter, "--dataset_name", ".", "--subset", "data/rl",
            "--batch_size", "2", "--mini_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--output_dir", str(tmp_path / "o")]
    _expect_error(capsys, "training_rl", args, adapter, "score", "not a reward model")


def test_a_tokenizer_with_no_eos_or_pad_token(tiny_model, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    config.pop("pad_token", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    tok = json.loads((broken / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (broken / "tokenizer.json").write_text(json.dumps(tok))
    args = ["--model_name_or_path", tiny_model, "--tokenizer_name", str(broken), "--dataset_name", ".",
            "--subset", "data/finetune", "--size_valid_set", "10", "--output_dir", str(tmp_path / "o")]
    _expect_error(capsys, "training_sft", args, "EOS")


def test_prompts_all_longer_than_the_limit(tiny_model, tmp_path, capsys):
    args = ["--model_name", tiny_model, "--reward_model_name", tiny_model, "--dataset_name", ".", "--subset", "data/rl",
            "--max_prompt_length", "2", "--output_dir", str(tmp_path / "o")]
    _expect_error(capsys, "training_rl", args, "--max_prompt_length", "nothing to train on")


def test_an_output_folder_holding_a_final_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    args = ["--model_name", tiny_model, "--reward_model_name", tiny_model, "--dataset_name", ".",
            "--output_dir", str(out)]
    _expect_error(capsys, "training_rl", args, "--output_dir", "--overwrite_output_dir")
    assert (out / "adapter_config.json").read_text() == "{}"


@pytest.mark.parametrize("script", ["training_sft", "training_reward_model", "training_rl", "training_dpo"])
def test_an_output_dir_that_is_a_file_is_refused_before_any_model_loads(script, tiny_model, tmp_path, capsys,
                                                                        monkeypatch):
    import common.modeling

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before --output_dir was checked")

    monkeypatch.setattr(common.modeling, "_from_pretrained", no_model)
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    args = ["--model_name_or_path", tiny_model, "--dataset_name", ".", "--output_dir", str(path)]
    if script == "training_rl":
        args += ["--reward_model_name", tiny_model]
    _expect_error(capsys, script, args, "--output_dir", str(path), "is a file")
    assert path.read_text() == "my notes"


# Tokenizers that do not fit the model: each stage stops with one message naming both sizes and the flag to change.


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A tiny model of 1024 embedding rows with its own 1024-token tokenizer (the `tiny_model` fixture has 2048)."""
    from common.tiny_model import main as build

    return build(["--output_dir", str(tmp_path_factory.mktemp("small") / "m"), "--vocab_size", "1024"])


@pytest.fixture(scope="module")
def extra_token_model(tiny_model, tmp_path_factory):
    """The tiny model whose own tokenizer adds a special token at id 2048, one past the embedding matrix (what
    Qwen2's tokenizer class does with `<|endoftext|>` on a model built with the base vocabulary)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("extra") / "m"
    shutil.copytree(tiny_model, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 2048
    tok.save_pretrained(folder)
    return str(folder)


def _reward_model(base, folder):
    from test_ppo import _save_reward_model

    return _save_reward_model(base, str(folder))


@pytest.fixture(scope="module")
def tiny_rm(tiny_model, tmp_path_factory):
    return _reward_model(tiny_model, tmp_path_factory.mktemp("tiny_rm") / "rm")


@pytest.fixture(scope="module")
def small_rm(small_model, tmp_path_factory):
    return _reward_model(small_model, tmp_path_factory.mktemp("small_rm") / "rm")


def _stage_args(script, model, tmp_path, *extra):
    data = {"training_sft": ["--dataset_name", ".", "--subset", "data/finetune", "--size_valid_set", "10"],
            "training_reward_model": ["--dataset_name", ".", "--eval_subset", "10", "--train_subset", "10"],
            "training_dpo": ["--dataset_name", ".", "--eval_subset", "10", "--train_subset", "10"],
            "training_rl": ["--dataset_name", ".", "--subset", "data/rl", "--batch_size", "2", "--mini_batch_size", "1",
                            "--gradient_accumulation_steps", "1"]}[script]
    return ["--model_name_or_path", model, *data, "--max_steps" if script != "training_rl" else "--steps", "2",
            "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("script", ["training_sft", "training_reward_model", "training_rl", "training_dpo"])
def test_a_tokenizer_larger_than_the_embedding_matrix(script, small_model, tiny_model, tiny_rm, tmp_path, capsys):
    extra = ["--tokenizer_name", tiny_model] + (["--reward_model_name", tiny_rm] if script == "training_rl" else [])
    _expect_error(capsys, script, _stage_args(script, small_model, tmp_path, *extra), "2048 tokens",
                  "1024 embedding rows", "--tokenizer_name")
    assert not os.path.exists(tmp_path / "out" / "adapter_config.json")


@pytest.mark.parametrize("script", ["training_sft", "training_reward_model", "training_rl", "training_dpo"])
def test_a_smaller_tokenizer_of_another_model(script, small_model, tiny_model, tiny_rm, tmp_path, capsys):
    extra = ["--tokenizer_name", small_model] + (["--reward_model_name", tiny_rm] if script == "training_rl" else [])
    _expect_error(capsys, script, _stage_args(script, tiny_model, tmp_path, *extra), "1024 tokens", "2048",
                  "--tokenizer_name")


def test_a_reward_tokenizer_that_does_not_fit_the_reward_model(small_rm, tiny_model, tmp_path, capsys):
    args = _stage_args("training_rl", tiny_model, tmp_path, "--reward_model_name", small_rm,
                       "--reward_tokenizer_name", tiny_model)
    _expect_error(capsys, "training_rl", args, "2048 tokens", "1024 embedding rows", "--reward_tokenizer_name")


@pytest.mark.parametrize("script", ["training_sft", "training_reward_model", "training_rl", "training_dpo"])
def test_a_special_token_past_the_embedding_matrix(script, extra_token_model, tiny_rm, tmp_path, capsys):
    extra = ["--reward_model_name", tiny_rm] if script == "training_rl" else []
    _expect_error(capsys, script, _stage_args(script, extra_token_model, tmp_path, *extra), "ids up to 2048",
                  "2048 embedding rows")


def test_merge_refuses_an_adapter_whose_tokenizer_does_not_fit_the_base(tiny_model, extra_token_model, tmp_path,
                                                                         capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(task_type="CAUSAL_LM", r=2)).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(extra_token_model).save_pretrained(adapter)
    _expect_error(capsys, "merge_with_lora",
                  ["--adapter_model_name", str(adapter), "--output_name", str(tmp_path / "m")],
                  "ids up to 2048", "2048 embedding rows", "--adapter_model_name")
    assert not os.path.exists(tmp_path / "m")
