"""training_dpo.py: DPO through TRL's DPOTrainer in this project's contracts. The loss against a by-hand
log-sigmoid, the tokenization against SFT's, StackLLaMA-2's flags, resume after a kill, and two processes. (Learning
on the pipeline's SFT model, with the implicit rewards read back from the saved adapter and ALGO=dpo's summary:
tests/test_pipeline.py.)"""

import json
import math
import os

import pytest
import torch

from common.outputs import read_metrics
from conftest import TORCHRUN, kill_after_checkpoint, mark_checkpoint, max_weight_diff, run_script

PAIRS = [
    {"question": "How do I list files in bash?", "response_j": "Use `ls -la` in the folder.",
     "response_k": "You cannot."},
    {"question": "How do I undo my last git commit?", "response_j": "Run `git reset --soft HEAD~1`; the changes stay.",
     "response_k": "Delete the repository and clone it again, then redo the work by hand."},
]


def _rows(pairs):
    """The pairs as the stage reads them: in StackLLaMA's layout, normalized (common/layouts.py)."""
    from datasets import Dataset

    from common.layouts import SPECS, Layout, normalize

    stackllama = SPECS["pairs"][0]
    layout = Layout(stackllama, {role: column for column, role in stackllama.columns}, conversational=False)
    return normalize("pairs", Dataset.from_list(pairs), layout)


def _answer_logps(model, tokenizer, question, answer):
    """log pi(answer + EOS | prompt), summed, from a plain forward of the model's own logits."""
    from common.prompts import tokenize_example

    ex = tokenize_example(tokenizer, question, answer)
    ids = torch.tensor([ex["input_ids"]])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    token_logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logp[torch.tensor(ex["completion_mask"][1:]).bool()].sum()


def test_dpo_loss_on_two_pairs_is_the_by_hand_log_sigmoid(tiny_model, tmp_path):
    """Full fine-tuning with a policy moved away from its reference: TRL's loss on our tokenized batch equals
    mean(-logsigmoid(beta * ((pi_j - ref_j) - (pi_k - ref_k)))) with log-probs summed over the answer and EOS."""
    import training_dpo

    script, config, model_args = training_dpo.parse([
        "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "unused"), "--use_peft", "false",
        "--beta", "0.5", "--max_length", "128", "--per_device_train_batch_size", "2", "--report_to", "none"])
    training_dpo.check_args(script, config)
    from common.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model, padding_side="right")
    ds, _ = training_dpo.tokenize_pairs(_rows(PAIRS), tokenizer, script, config.max_length, "test", verbose=False)
    # The prompt is exactly what SFT puts before an answer and PPO generates from.
    from common.prompts import tokenize_example

    for pair, row in zip(PAIRS, ds):
        for key, answer in (("chosen_ids", "response_j"), ("rejected_ids", "response_k")):
            assert row["prompt_ids"] + row[key] == tokenize_example(tokenizer, pair["question"], pair[answer])[
                "input_ids"]
    trainer = training_dpo.build_trainer(script, config, model_args, tokenizer, ds, eval_ds=ds)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = trainer.data_collator([ds[0], ds[1]])
    loss = trainer.compute_loss(trainer.model, batch)

    by_hand = []
    with torch.no_grad():
        for pair in PAIRS:
            pol = [_answer_logps(trainer.model, tokenizer, pair["question"], pair[a])
                   for a in ("response_j", "response_k")]
            ref = [_answer_logps(trainer.ref_model, tokenizer, pair["question"], pair[a])
                   for a in ("response_j", "response_k")]
            by_hand.append(-torch.nn.functional.logsigmoid(0.5 * ((pol[0] - ref[0]) - (pol[1] - ref[1]))))
    expected = torch.stack(by_hand).mean()
    assert abs(expected.item() - math.log(2)) > 0.05  # the policy really moved: not the loss of equal models
    assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)


def test_stackllama2_flags_and_defaults():
    """dpo_llama2.py's flags parse to the same settings (docs/stackllama.md), and its defaults are the defaults."""
    import training_dpo

    script, config, model_args = training_dpo.parse(["--model_name_or_path=sft/final_checkpoint",
                                                     "--output_dir=dpo"])
    assert (config.beta, config.learning_rate, config.lr_scheduler_type, config.warmup_steps, config.weight_decay) == (
        0.1, 5e-4, "cosine", 100, 0.05)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.max_length,
            config.max_steps, config.logging_steps, config.save_steps, config.eval_steps) == (4, 4, 1024, 1000, 10,
                                                                                              100, 100)
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, model_args.use_peft) == (8, 16, 0.05,
                                                                                                       True)
    assert script.train_data_dir == "data/rl" and script.eval_data_dir == "data/evaluation"
    assert config.optim == ("paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch")
    argv = ["--model_name_or_path", "m", "--beta", "0.2", "--learning_rate", "1e-4", "--lr_scheduler_type", "linear",
            "--warmup_steps", "5", "--weight_decay", "0.01", "--optimizer_type", "adamw_torch",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1",
            "--gradient_accumulation_steps", "8", "--gradient_checkpointing", "true", "--lora_alpha", "32",
            "--lora_dropout", "0.1", "--lora_r", "4", "--max_prompt_length", "100", "--max_length", "300",
            "--max_steps", "7", "--logging_steps", "1", "--save_steps", "3", "--eval_steps", "3",
            "--output_dir", "out", "--load_in_4bit", "true", "--model_dtype", "float16", "--report_to", "none",
            "--seed", "5", "--loss_type", "ipo"]
    script, config, model_args = training_dpo.parse(argv)
    assert (config.beta, config.learning_rate, config.lr_scheduler_type, config.warmup_steps, config.weight_decay,
            config.optim) == (0.2, 1e-4, "linear", 5, 0.01, "adamw_torch")
    assert (config.per_device_train_batch_size, config.per_device_eval_batch_size, config.gradient_accumulation_steps,
            config.gradient_checkpointing) == (2, 1, 8, True)
    assert (model_args.lora_alpha, model_args.lora_dropout, model_args.lora_r, model_args.load_in_4bit,
            model_args.dtype) == (32, 0.1, 4, True, "float16")
    assert (script.max_prompt_length, config.max_length, config.max_steps, config.save_steps, config.seed,
            config.loss_type) == (100, 300, 7, 3, 5, ["ipo"])


@pytest.mark.parametrize("args, needle", [
    (["--beta", "0"], "--beta"),
    (["--max_prompt_length", "300", "--max_length", "256"], "--max_prompt_length"),
    (["--precompute_ref_log_probs", "true"], "--precompute_ref_log_probs"),
    (["--max_train_seconds", "-1"], "--max_train_seconds")])
def test_a_bad_flag_is_one_error_line(args, needle, tmp_path, capsys):
    from test_bad_input import _expect_error

    _expect_error(capsys, "training_dpo", ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), *args],
                  needle)
    assert not os.path.exists(tmp_path / "o")


DATA = ["--dataset_name", ".", "--train_data_dir", "data/reward", "--max_length", "256", "--warmup_steps", "0",
        "--gradient_accumulation_steps", "1", "--disable_tqdm", "true"]


@pytest.mark.slow
def test_dpo_killed_after_a_checkpoint_resumes_to_the_same_weights(tiny_model, tmp_path):
    args = ["training_dpo.py", "--model_name_or_path", tiny_model, *DATA, "--train_subset", "64", "--eval_subset",
            "8", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "6",
            "--save_steps", "3", "--eval_steps", "6", "--logging_steps", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_script(*args, "--output_dir", full)
    kill_after_checkpoint([*args, "--output_dir", cut], os.path.join(cut, "checkpoint-3"))
    marker = mark_checkpoint(os.path.join(cut, "checkpoint-3"))
    run_script(*args, "--output_dir", cut, "--resume_from_checkpoint", "latest")
    assert os.path.isfile(marker), "checkpoint-3 was saved again: the run started over instead of resuming"
    assert [m["step"] for m in read_metrics(cut) if "loss" in m] == list(range(1, 7))
    assert max_weight_diff(full, cut, "adapter_model.safetensors") < 1e-5
    assert max_weight_diff(full, os.path.join(full, "checkpoint-3"), "adapter_model.safetensors") > 1e-4


@pytest.mark.slow
def test_dpo_on_two_processes_learns_like_one_with_the_same_global_batch(tiny_model, tmp_path):
    args = ["--model_name_or_path", tiny_model, *DATA, "--train_subset", "64", "--eval_subset", "9",
            "--learning_rate", "1e-3", "--max_steps", "4", "--save_steps", "4", "--eval_steps", "4",
            "--logging_steps", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("training_dpo.py", *args, "--per_device_train_batch_size", "4", "--output_dir", one)
    proc = run_script(*TORCHRUN, "--master_port", "29563", "training_dpo.py", *args,
                      "--per_device_train_batch_size", "2", "--output_dir", two)
    assert proc.stdout.count("saved to") == 1  # only the main process prints and saves
    a = [m["loss"] for m in read_metrics(one) if "loss" in m]
    b = [m["loss"] for m in read_metrics(two) if "loss" in m]
    assert len(a) == len(b) == 4 and abs(a[0] - b[0]) < 1e-4, (a, b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)
    # The implicit rewards of all 9 evaluation pairs, gathered from both processes without the padding repeat.
    reports = [json.load(open(os.path.join(d, "eval_report.json"))) for d in (one, two)]
    assert reports[0]["n_pairs"] == reports[1]["n_pairs"] == 9
    assert abs(reports[0]["mean_margin"] - reports[1]["mean_margin"]) < 0.05


def test_time_limit_stops_at_the_first_step_past_the_budget_on_this_process_clock(monkeypatch):
    """`--max_train_seconds`' callback: no stop before the budget, a stop (and its step recorded) at the first step
    that ends at or past it; the clock starts at on_train_begin."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import common.stage
    from common.stage import TimeLimit

    clock = iter([100.0, 104.9, 105.0])
    monkeypatch.setattr(common.stage.time, "monotonic", lambda: next(clock))
    limit, state, control = TimeLimit(5.0), TrainerState(), TrainerControl()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    limit.on_train_begin(args, state, control)
    state.global_step = 7
    limit.on_step_end(args, state, control)
    assert not control.should_training_stop and limit.stopped_at is None
    state.global_step = 8
    limit.on_step_end(args, state, control)
    assert control.should_training_stop and limit.stopped_at == 8
