"""Two processes on CPU (torchrun, gloo): every script runs, only the main process prints and saves, and
two processes learn like one with the same global batch. (PPO's two-process run: tests/test_ppo.py.)"""

import os

import pytest

from common.outputs import read_metrics
from conftest import TORCHRUN, assert_user_error, run_script

SFT = ["--dataset_name", ".", "--subset", "data/finetune", "--size_valid_set", "16", "--seq_length", "64",
       "--max_steps", "12", "--eval_freq", "12", "--save_freq", "12", "--learning_rate", "3e-3",
       "--num_warmup_steps", "1", "--lora_modules_to_save", "lm_head", "--disable_tqdm", "true"]


@pytest.mark.slow
def test_sft_two_processes_learn_like_one_with_the_same_global_batch(tiny_model, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("training_sft.py", "--model_name_or_path", tiny_model, *SFT, "--batch_size", "8", "--output_dir", one)
    proc = run_script(*TORCHRUN, "--master_port", "29561", "training_sft.py", "--model_name_or_path", tiny_model, *SFT,
                      "--batch_size", "4", "--output_dir", two)
    assert proc.stdout.count("saved to") == 1  # only the main process prints and saves
    a = [m["loss"] for m in read_metrics(one) if "loss" in m]
    b = [m["loss"] for m in read_metrics(two) if "loss" in m]
    assert len(a) == len(b) == 12
    assert a[-1] < 0.9 * a[0] and b[-1] < 0.9 * b[0]  # both learn
    assert abs(sum(a[-4:]) / 4 - sum(b[-4:]) / 4) < 0.1 * a[0]  # and end in the same place
    assert os.path.isfile(os.path.join(two, "adapter_model.safetensors"))
    # The checkpoint holds both processes' RNG states: renamed into place only after both wrote theirs.
    assert sorted(n for n in os.listdir(two) if n.startswith("checkpoint")) == ["checkpoint-12"]
    for name in ("rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt",
                 "trainer_state.json"):
        assert os.path.isfile(os.path.join(two, "checkpoint-12", name)), name
    # Resumed with one process, the data order and RNG states would not continue as they would have: refused.
    proc = run_script("training_sft.py", "--model_name_or_path", tiny_model, *SFT, "--batch_size", "8",
                      "--max_steps", "24", "--output_dir", two, "--resume_from_checkpoint", "latest", check=False)
    assert_user_error(proc, "checkpoint-12", "2 processes", "this run has 1")


@pytest.mark.slow
def test_reward_model_runs_on_two_processes(tiny_model, tmp_path):
    out = str(tmp_path / "rm")
    proc = run_script(*TORCHRUN, "--master_port", "29562", "training_reward_model.py",
                      "--model_name_or_path", tiny_model,
                      "--dataset_name", ".", "--max_length", "256", "--per_device_train_batch_size", "4",
                      "--learning_rate", "1e-3", "--max_steps", "6", "--eval_steps", "6", "--save_steps", "6",
                      "--eval_subset", "40", "--logging_steps", "1", "--disable_tqdm", "true", "--output_dir", out)
    assert proc.stdout.count("saved to") == 1
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-1] == 6
    assert (os.path.isfile(os.path.join(out, "eval_report.json"))
            and os.path.isfile(os.path.join(out, "reward_stats.json")))


def test_merge_refuses_to_run_on_two_processes(tmp_path):
    proc = run_script("merge_with_lora.py", "--adapter_model_name", str(tmp_path), "--output_name", str(tmp_path / "o"),
                      check=False, env={"WORLD_SIZE": "2"})
    assert_user_error(proc, "one process")
