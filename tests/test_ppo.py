"""Stage 3 end to end on tiny models: outputs, metrics, resume, tokenizers, processes, and bad input."""

import json
import os

import pytest
import torch

from common.cli import UserError
from common.outputs import read_metrics
from conftest import TORCHRUN, assert_user_error, mark_checkpoint, max_weight_diff, run_script

METRIC_KEYS = [
    "step", "episodes", "objective/scores", "objective/scores_std", "objective/kl", "objective/kl_coef",
    "objective/rlhf_reward", "objective/entropy", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
    "val/clipfrac", "val/explained_variance", "response/length_mean", "response/eos_fraction", "time/generate",
    "time/score", "time/train", "throughput/episodes_per_s",
]
FAST = ["--dataset_name", ".", "--subset", "data/rl", "--batch_size", "8", "--mini_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--ppo_epochs", "2", "--output_min_length", "6",
        "--output_max_length", "12", "--learning_rate", "1e-3", "--disable_tqdm", "true"]


def _save_reward_model(base: str, out: str, seed: int = 0) -> str:
    """A sequence classifier on ``base`` with a random but saved `score` head: enough to drive PPO."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory):
    return _save_reward_model(tiny_model, str(tmp_path_factory.mktemp("rm") / "rm"))


def ppo(tiny_model, reward_model, out, *extra, check=True, launcher=None):
    args = ["training_rl.py", "--model_name", tiny_model, "--reward_model_name", reward_model, *FAST,
            "--output_dir", out, *extra]
    if launcher:
        args = [*launcher, *args]
    return run_script(*args, check=check)


@pytest.mark.slow
def test_ppo_writes_metrics_samples_and_checkpoints(tiny_model, reward_model, tmp_path):
    from safetensors.torch import load_file

    full = str(tmp_path / "full")
    common = ["--steps", "32", "--save_freq", "2"]  # 4 PPO steps of 8 episodes (resume: test_reliability.py)
    ppo(tiny_model, reward_model, full, *common)
    metrics = read_metrics(full)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["episodes"] == 32
    for key in METRIC_KEYS:
        assert all(key in m for m in metrics), key
    assert all(abs(m["objective/kl"]) < 10 for m in metrics)
    assert metrics[0]["objective/kl"] == 0.0  # policy == reference
    samples = [json.loads(line) for line in open(os.path.join(full, "samples.jsonl"))]
    assert {s["step"] for s in samples} == {1, 2, 3, 4}
    assert all({"question", "response", "score"} <= set(s) for s in samples)
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "README.md", "run_args.yaml",
            "tokenizer.json", "checkpoint-2", "checkpoint-4"} <= set(os.listdir(full))
    # accelerate's save_state: optimizer, per-process RNG; run_state.json: our own state as JSON (counters, KL
    # controller, running moments, prompt position, length sampler, scheduler); the policy as an adapter folder
    # with its value head
    expected = {"optimizer.bin", "random_states_0.pkl", "trainer_state.json", "value_head.safetensors",
                "adapter_config.json", "adapter_model.safetensors", "run_state.json", "origin.json"}
    assert expected == set(os.listdir(os.path.join(full, "checkpoint-2"))) - {"README.md"}
    state = json.load(open(os.path.join(full, "checkpoint-2", "trainer_state.json")))
    assert state["global_step"] == 2 and state["episodes"] == 16
    assert state["kl_coef"] == metrics[2]["objective/kl_coef"]  # the coefficient step 3 used

    # The adapter really moved away from the reference (LoRA B starts at zero).
    adapter = load_file(os.path.join(full, "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0


@pytest.mark.slow
def test_full_fine_tuning_with_a_reward_model_of_another_tokenizer_resumes_exactly_and_strictly(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from common.tiny_model import main as build

    other = build(["--output_dir", str(tmp_path / "other"), "--vocab_size", "1024", "--hidden_size", "128",
                   "--seed", "1"])
    rm = _save_reward_model(other, str(tmp_path / "rm_other"))
    out = str(tmp_path / "ppo")
    args = ["--steps", "16", "--use_peft", "false", "--learning_rate", "1e-5", "--save_freq", "1"]
    ppo(tiny_model, rm, out, *args)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["objective/kl"] is not None for m in metrics)
    assert metrics[0]["objective/kl"] == 0.0  # the reference is an exact copy of the policy at the first step
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "value_head.safetensors"))
    assert os.path.isfile(os.path.join(out, "checkpoint-1", "config.json"))  # a checkpoint is a loadable model folder

    # A crash after checkpoint-1, resumed: the weights of the uninterrupted run.
    cut = tmp_path / "cut"
    shutil.copytree(os.path.join(out, "checkpoint-1"), cut / "checkpoint-1")
    marker = mark_checkpoint(str(cut / "checkpoint-1"))
    ppo(tiny_model, rm, str(cut), *args, "--resume_from_checkpoint", "latest")
    assert os.path.isfile(marker), "checkpoint-1 was saved again: the run started over instead of resuming"
    assert [m["step"] for m in read_metrics(str(cut))] == [2]  # only the step after the checkpoint was trained
    assert max_weight_diff(out, str(cut), "model.safetensors") < 1e-6
    assert max_weight_diff(out, str(cut), "value_head.safetensors") < 1e-6

    # A checkpoint missing one weight does not load with that weight left as it was: it is refused, naming it.
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(out, "checkpoint-1"), broken / "checkpoint-1")
    weights = load_file(broken / "checkpoint-1" / "model.safetensors")
    dropped = sorted(weights)[3]
    save_file({k: v for k, v in weights.items() if k != dropped}, broken / "checkpoint-1" / "model.safetensors",
              metadata={"format": "pt"})
    proc = ppo(tiny_model, rm, str(broken), *args, "--resume_from_checkpoint", "latest", check=False)
    assert_user_error(proc, "no complete checkpoint")  # its origin.json records another size: a cut-short write
    origin = json.load(open(broken / "checkpoint-1" / "origin.json"))  # recorded as written: the weight is missing
    origin["files"]["model.safetensors"] = os.path.getsize(broken / "checkpoint-1" / "model.safetensors")
    json.dump(origin, open(broken / "checkpoint-1" / "origin.json", "w"))
    proc = ppo(tiny_model, rm, str(broken), *args, "--resume_from_checkpoint", "latest", check=False)
    assert_user_error(proc, "missing", dropped)


@pytest.mark.slow
def test_two_processes_and_a_resume_with_another_number_of_processes_is_refused(tiny_model, reward_model, tmp_path):
    out = str(tmp_path / "ddp")
    proc = ppo(tiny_model, reward_model, out, "--steps", "16", "--batch_size", "4", "--mini_batch_size", "2",
               "--save_freq", "2", launcher=[*TORCHRUN, "--master_port", "29517"])
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["episodes"] == 32  # 2 x 4 per step
    assert proc.stdout.count("saved to") == 1  # only the main process prints and saves
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(os.path.join(out, "checkpoint-4")))
    proc = ppo(tiny_model, reward_model, out, "--steps", "24", "--batch_size", "4", "--mini_batch_size", "2",
               "--resume_from_checkpoint", "latest", check=False)
    assert_user_error(proc, "checkpoint-4", "2 processes", "this run has 1")
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_rloo_and_grpo_answer_in_groups_log_ppos_metrics_and_resume_exactly(tiny_model, reward_model, tmp_path,
                                                                             algorithm):
    import shutil

    from safetensors.torch import load_file

    args = ["--algorithm", algorithm, "--num_generations", "4", "--steps", "24", "--save_freq", "1",
            "--samples_per_step", "8"]
    full = str(tmp_path / "full")
    ppo(tiny_model, reward_model, full, *args)
    metrics = read_metrics(full)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["episodes"] == 24
    for key in METRIC_KEYS:  # PPO's names where the meaning is the same; no critic, so no value numbers
        assert all((key in m) == (key not in ("loss/value", "val/clipfrac", "val/explained_variance")) for m in metrics)
    assert all(("loss/kl" in m) == (algorithm == "grpo") for m in metrics)  # GRPO's KL term of the loss
    assert metrics[0]["objective/kl"] == 0.0 and metrics[0]["policy/approxkl"] > 0  # the update moved the policy
    # Each step answers 8 / 4 = 2 prompts, each 4 times in a row; every step other prompts.
    samples = [json.loads(line) for line in open(os.path.join(full, "samples.jsonl"))]
    questions = [[s["question"] for s in samples if s["step"] == step] for step in (1, 2, 3)]
    for q in questions:
        assert len(q) == 8 and len(set(q[:4])) == len(set(q[4:])) == 1 and q[0] != q[4]
    assert len({q[0] for q in questions} | {q[4] for q in questions}) == 6
    state = json.load(open(os.path.join(full, "checkpoint-1", "trainer_state.json")))
    assert (state["algorithm"], state["group_size"]) == (algorithm, 4)
    assert all(v.abs().max() == 0 for v in load_file(os.path.join(full, "value_head.safetensors")).values())
    adapter = load_file(os.path.join(full, "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0

    # From checkpoint-1 (a crash after it): the uninterrupted run's weights.
    cut = tmp_path / "cut"
    shutil.copytree(os.path.join(full, "checkpoint-1"), cut / "checkpoint-1")
    marker = mark_checkpoint(str(cut / "checkpoint-1"))
    ppo(tiny_model, reward_model, str(cut), *args, "--resume_from_checkpoint", "latest")
    assert os.path.isfile(marker), "checkpoint-1 was saved again: the run started over instead of resuming"
    assert [m["step"] for m in read_metrics(str(cut))] == [2, 3]
    assert max_weight_diff(full, str(cut), "adapter_model.safetensors") < 1e-5

    if algorithm == "rloo":
        return
    # Its checkpoint resumed with another algorithm: refused, naming both (checked once: it does not depend on which).
    other = tmp_path / "other"
    shutil.copytree(os.path.join(full, "checkpoint-1"), other / "checkpoint-1")
    swapped = [{"rloo": "grpo", "grpo": "rloo"}.get(x, x) for x in args]
    proc = ppo(tiny_model, reward_model, str(other), *swapped, "--resume_from_checkpoint", "latest", check=False)
    assert_user_error(proc, "checkpoint-1", f"--algorithm {algorithm}", "this run has --algorithm")


def test_stackllama_flags_parse_with_their_meaning():
    import training_rl

    a, c, m = training_rl.parse([
        "--log_with=wandb", "--model_name=M", "--reward_model_name=R", "--adafactor=False", "--tokenizer_name=T",
        "--save_freq=100", "--output_max_length=128", "--batch_size=8", "--gradient_accumulation_steps=8",
        "--batched_gen=True", "--ppo_epochs=4", "--seed=0", "--learning_rate=1.4e-5", "--early_stopping=True",
        "--output_dir=llama-se-rl-finetune", "--steps", "20000", "--init_kl_coef", "0.2", "--adap_kl_ctrl", "True",
        "--target_kl", "0.1", "--reward_baseline", "0.0", "--mini_batch_size", "1", "--load_in_8bit",
    ])
    assert (m.model_name_or_path, m.tokenizer_name, a.reward_model_name, a.report_to) == ("M", "T", "R", "wandb")
    assert (c.adafactor, c.batched_gen, c.early_stopping, a.save_freq, c.batch_size, c.steps) == (
        False, True, True, 100, 8, 20000)
    assert c.learning_rate == 1.4e-5 and m.load_in_8bit and c.output_min_length == 32 and c.target == 6.0
    assert (c.init_kl_coef, c.adap_kl_ctrl, c.target_kl, c.mini_batch_size, c.gradient_accumulation_steps) == (
        0.2, True, 0.1, 1, 8)


def test_number_flags_that_may_be_none_take_none_on_the_command_line():
    import training_rl

    _, c, _ = training_rl.parse(["--cliprange_value", "None", "--max_grad_norm", "none", "--reward_clip", "2.5",
                                 "--generation_batch_size", "null", "--missing_eos_penalty", "1"])
    assert (c.cliprange_value, c.max_grad_norm, c.reward_clip, c.generation_batch_size, c.missing_eos_penalty) == (
        None, None, 2.5, None, 1.0)
    with pytest.raises(UserError, match="--cliprange_value.*invalid float value: 'abc'"):
        training_rl.parse(["--cliprange_value", "abc"])
    with pytest.raises(UserError, match="--batch_size.*invalid int value: 'None'"):
        training_rl.parse(["--batch_size", "None"])  # not optional: None stays an error


@pytest.mark.parametrize("flags, needle", [
    (["--batch_size", "6", "--mini_batch_size", "4"], "--batch_size"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--steps", "0"], "--steps"),
    (["--output_max_length", "0"], "--output_max_length"),
    (["--max_prompt_length", "3"], "--max_prompt_length"),
    (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit"),
    (["--reward_model_name", "./missing/rm"], "./missing/rm"),
    (["--algorithm", "grpo", "--num_generations", "3"], "--batch_size 8 must be divisible by --num_generations 3"),
    (["--algorithm", "rloo", "--num_generations", "1"], "--num_generations must be >= 2"),
    (["--num_generations", "4"], "--num_generations is a setting of --algorithm rloo or grpo"),
    (["--algorithm", "rloo", "--scale_rewards", "none"], "--scale_rewards is a setting of --algorithm grpo"),
    (["--algorithm", "grpo", "--loss_type", "sequence"], "--loss_type must be token, grpo or dr_grpo"),
    (["--algorithm", "a2c"], "--algorithm"),
])
def test_bad_flags_give_one_clear_message(tiny_model, reward_model, tmp_path, capsys, flags, needle):
    import training_rl
    from common.cli import run

    args = ["--model_name", tiny_model, "--reward_model_name", reward_model, *FAST, "--output_dir", str(tmp_path / "o"),
            *flags]
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: training_rl.main(*training_rl.parse(args)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "\nerror: " in "\n" + err and needle in err.split("error: ", 1)[1], err


def test_a_causal_lm_is_not_a_reward_model(tiny_model, tmp_path, capsys):
    import training_rl
    from common.cli import run

    args = ["--model_name", tiny_model, "--reward_model_name", tiny_model, *FAST, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: training_rl.main(*training_rl.parse(args)))
    err = capsys.readouterr().err
    # one user error (exit 2, no traceback) that says why, not just any message that mentions a score
    assert exit_info.value.code == 2 and "Traceback" not in err and err.count("error: ") == 1, err
    message = err.split("error: ", 1)[1]
    assert "--reward_model_name" in message and "not a reward model" in message, err


@pytest.mark.slow
def test_held_out_evaluation_is_logged_and_leaves_training_unchanged(tiny_model, reward_model, tmp_path):
    """--eval_freq answers held-out questions at step 0, every N steps and at the last step (eval/* in
    metrics.jsonl, with the gold judge on the sample data); it samples from its own seed with the training RNG
    streams saved and restored, so the run's weights are exactly those of the same run without it."""
    plain, evaluated = str(tmp_path / "plain"), str(tmp_path / "evaluated")
    ppo(tiny_model, reward_model, plain, "--steps", "24")
    ppo(tiny_model, reward_model, evaluated, "--steps", "24", "--eval_freq", "2", "--eval_prompts", "6")
    metrics = read_metrics(evaluated)
    held_out = [m for m in metrics if "eval/rm_score" in m]
    assert [m["step"] for m in held_out] == [0, 2, 3]
    for m in held_out:
        assert m["eval/prompts"] == 6 and 1 <= m["eval/length"] <= 12
        assert m["eval/gold"] is not None  # data/evaluation has answer keys (None where an answer has none)
    assert max_weight_diff(plain, evaluated, "adapter_model.safetensors") == 0.0
    assert [m["objective/scores"] for m in read_metrics(plain)] == [m["objective/scores"] for m in metrics if m["step"]]
