"""Runs that are stopped, resumed or pointed at the wrong place: Ctrl-C and SIGTERM end with one line and resume to
the weights of an uninterrupted run; checkpoints record their model and refuse another; an unfinished run is never
started over silently; a place that cannot be written is one error line before any model loads."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.cli import UserError
from common.outputs import read_metrics
from conftest import OFFLINE_ENV, ROOT, assert_user_error, max_weight_diff, run_script

SFT = ["training_sft.py", "--dataset_name", ".", "--subset", "data/finetune", "--size_valid_set", "8",
       "--seq_length", "64", "--batch_size", "2", "--max_steps", "12", "--save_freq", "3", "--eval_freq", "100",
       "--learning_rate", "1e-3", "--disable_tqdm", "true"]
PAIRS = ["--dataset_name", ".", "--train_subset", "32", "--eval_subset", "4", "--max_length", "256",
         "--per_device_train_batch_size", "2", "--max_steps", "10", "--save_steps", "2", "--eval_steps", "100",
         "--logging_steps", "1", "--learning_rate", "1e-4", "--disable_tqdm", "true"]
RL = ["--dataset_name", ".", "--subset", "data/rl", "--batch_size", "4", "--mini_batch_size", "2",
      "--gradient_accumulation_steps", "1", "--output_min_length", "4", "--output_max_length", "6",
      "--learning_rate", "1e-3", "--steps", "24", "--save_freq", "2", "--disable_tqdm", "true"]


def stage_commands(tiny_model, rm):
    """(name, command without --output_dir, the final weights file) of every training stage."""
    rl = ["training_rl.py", "--model_name", tiny_model, "--reward_model_name", rm, *RL]
    return [
        ("SFT", [*SFT, "--model_name_or_path", tiny_model], "adapter_model.safetensors"),
        ("reward model", ["training_reward_model.py", "--model_name_or_path", tiny_model, *PAIRS],
         "adapter_model.safetensors"),
        ("DPO", ["training_dpo.py", "--model_name_or_path", tiny_model, "--train_data_dir", "data/reward", *PAIRS],
         "adapter_model.safetensors"),
        ("PPO", rl, "adapter_model.safetensors"),
        ("RLOO", [*rl, "--algorithm", "rloo", "--num_generations", "2"], "adapter_model.safetensors"),
        ("GRPO", [*rl, "--algorithm", "grpo", "--num_generations", "2"], "adapter_model.safetensors"),
    ]


def interrupt_at_random(cmd: list[str], out: str, signum: int, rng: random.Random, timeout: float = 300):
    """Start ``cmd``, wait until it has trained a first step, send ``signum`` after a random delay; return the
    process (finished)."""
    proc = subprocess.Popen([sys.executable, *cmd, "--output_dir", out], cwd=ROOT, env={**os.environ, **OFFLINE_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    metrics = os.path.join(out, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
        proc.send_signal(signum)
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory):
    from test_ppo import _save_reward_model

    return _save_reward_model(tiny_model, str(tmp_path_factory.mktemp("rm") / "rm"))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(6), ids=["SFT", "reward model", "DPO", "PPO", "RLOO", "GRPO"])
def test_interrupted_at_a_random_moment_each_stage_resumes_to_the_same_weights(tiny_model, reward_model, tmp_path,
                                                                             index):
    name, cmd, weights = stage_commands(tiny_model, reward_model)[index]
    rng = random.Random(1000 + index)
    signum = signal.SIGINT if index % 2 == 0 else signal.SIGTERM
    extra = [] if signum == signal.SIGINT else ["--save_on_interrupt", "true"]  # a cluster's preemption: save first
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_script(*cmd, "--output_dir", full)

    proc = interrupt_at_random([*cmd, *extra], cut, signum, rng)
    if proc.returncode != 0:  # interrupted (not finished before the signal)
        assert proc.returncode == 128 + signum, proc.stderr_text[-2000:]
        assert "Traceback" not in proc.stderr_text, proc.stderr_text[-3000:]
        lines = [line for line in proc.stderr_text.splitlines() if line.startswith("interrupted (")]
        assert len(lines) == 1, proc.stderr_text[-2000:]
        assert f"interrupted ({signal.Signals(signum).name}) at step " in lines[0] and "continue with: " in lines[0] \
            or "no checkpoint was saved yet" in lines[0]
        if signum == signal.SIGTERM:  # --save_on_interrupt: the step it stopped at is the newest checkpoint
            step = int(lines[0].split(" at step ")[1].split()[0])
            assert f"checkpoint-{step};" in lines[0], lines[0]
        for checkpoint in (n for n in os.listdir(cut) if re.fullmatch(r"checkpoint-\d+", n)):  # not a .tmp cut short
            origin = json.load(open(os.path.join(cut, checkpoint, "origin.json")))
            assert origin["base_model"] == tiny_model and origin["fingerprint"]["architecture"]["vocab_size"]
    if not os.path.isfile(os.path.join(cut, "adapter_config.json")):  # the signal came before the final save
        # the same command again continues (or, without a checkpoint yet, starts again)
        again = run_script(*cmd, *extra, "--output_dir", cut)
        if "newest checkpoint" in proc.stderr_text:
            assert "resuming from " in again.stdout and "the same command" in again.stdout
    assert max_weight_diff(full, cut, weights) < 1e-5, name


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_a_checkpoint_refuses_another_model_and_an_unfinished_run_another_command(tiny_model, tmp_path):
    from common.tiny_model import main as build

    other = build(["--output_dir", str(tmp_path / "other"), "--vocab_size", "1000"])
    out = str(tmp_path / "sft")
    cmd = [*SFT, "--model_name_or_path", tiny_model, "--output_dir", out]
    proc = subprocess.run([sys.executable, *cmd, "--max_steps", "6"], cwd=ROOT, env={**os.environ, **OFFLINE_ENV},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shutil.rmtree(os.path.join(out, "checkpoint-6"))  # as if it had stopped after step 3: no final model
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.remove(os.path.join(out, name))

    proc = run_script(*cmd, check=False)  # another command (no --max_steps 6): never starts over silently
    assert_user_error(proc, f"newest: {out}/checkpoint-3, step 3", "--resume_from_checkpoint latest",
                      "--overwrite_output_dir")
    swapped = [other if a == tiny_model else a for a in cmd]
    proc = run_script(*swapped, "--resume_from_checkpoint", "latest", check=False)
    assert_user_error(proc, f"was trained from {tiny_model} and this run loads {other}", "vocab_size 2048 vs 1000")
    assert not os.path.isfile(os.path.join(out, "adapter_config.json"))

    tmp = os.path.join(out, "checkpoint-9.tmp")  # a save cut short
    shutil.copytree(os.path.join(out, "checkpoint-3"), tmp)
    os.remove(os.path.join(tmp, "optimizer.pt"))
    proc = run_script(*cmd, "--resume_from_checkpoint", tmp, check=False)
    assert_user_error(proc, "missing optimizer.pt", f"the newest complete checkpoint is {out}/checkpoint-3")

    proc = run_script(*cmd, "--resume_from_checkpoint", "latest")
    assert f"resuming from {out}/checkpoint-3 (step 3 of 12)" in proc.stdout
    proc = run_script(*cmd, "--overwrite_output_dir", "true", "--max_steps", "3")
    assert "removed" in proc.stdout and sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == \
        ["checkpoint-3"]


def test_an_incomplete_checkpoint_is_named_with_what_it_lacks(tmp_path):
    from common.checkpoints import write_origin
    from common.outputs import find_checkpoint

    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "value_head.safetensors").write_bytes(b"x" * 10)
        write_origin(str(folder), {"base_model": "m"})
    (tmp_path / "checkpoint-4" / "value_head.safetensors").unlink()
    assert find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-2")
    with pytest.raises(UserError, match=r"checkpoint-4 is incomplete: missing value_head.safetensors; the newest "
                                        r"complete checkpoint is .*checkpoint-2"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-4"))
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-6.tmp")
    (tmp_path / "checkpoint-6.tmp" / "origin.json").unlink()
    with pytest.raises(UserError, match=r"a save cut short.*missing origin.json"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-6.tmp"))


# ---------------------------------------------------------------------------------------------- places to write


def test_every_unwritable_place_is_one_line(tmp_path, monkeypatch):
    import errno

    from common.outputs import check_writable

    regular = tmp_path / "a_file"
    regular.write_text("x")
    with pytest.raises(UserError, match="a part of the path is a file, not a folder"):
        check_writable(str(regular / "out"), "--output_dir")
    with pytest.raises(UserError, match="cannot be created there"):
        check_writable("/proc/no/such/out", "--output_dir")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # a disk that fills up on the first real write
    with pytest.raises(UserError, match="--output_dir .*: cannot write there \\(the disk is full\\)"):
        check_writable(str(tmp_path / "out"), "--output_dir")
    assert not os.path.exists(tmp_path / "out")  # neither the probe file nor the folder made for it is left
    monkeypatch.undo()
    check_writable(str(tmp_path / "ok" / "deeper"), "--output_dir")
    assert not os.path.exists(tmp_path / "ok")


def _in_namespace(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (unshare): mounts there are gone when it ends."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no mount namespaces here (unshare -rm)")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **OFFLINE_ENV})


@pytest.mark.slow
def test_each_stage_refuses_a_place_it_cannot_write_before_loading_a_model(tiny_model, reward_model, tmp_path):
    ro, full = str(tmp_path / "ro"), str(tmp_path / "full")
    os.makedirs(ro)
    os.makedirs(full)
    py = sys.executable
    cases = {  # stage -> (command, flag)
        "sft": ([*SFT, "--model_name_or_path", tiny_model, "--output_dir"], "--output_dir"),
        "rm": (["training_reward_model.py", "--model_name_or_path", tiny_model, *PAIRS, "--output_dir"],
               "--output_dir"),
        "dpo": (["training_dpo.py", "--model_name_or_path", tiny_model, *PAIRS, "--output_dir"], "--output_dir"),
        "rl": (["training_rl.py", "--model_name", tiny_model, "--reward_model_name", reward_model, *RL,
                "--output_dir"], "--output_dir"),
        "evaluate": (["evaluate.py", "--models", f"a={tiny_model}", "--reward_model_name", reward_model,
                      "--output_dir"], "--output_dir"),
    }
    # a read-only file system (each stage) and a full disk (one): a tmpfs mounted read-only, and one of 8 KiB full
    script = (f'mount -t tmpfs -o ro,size=1m tmpfs {ro} && mount -t tmpfs -o size=8k tmpfs {full} && '
              f'head -c 8192 /dev/zero > {full}/filler 2>/dev/null; ') + " ; ".join(
        f'{py} {" ".join(cmd)} {ro}/{name} 2>&1 | tail -n 3; echo "rc=$?"' for name, (cmd, _) in cases.items()) + \
        f' ; {py} {" ".join(cases["sft"][0])} {full}/sft 2>&1 | tail -n 3'
    proc = _in_namespace(script)
    for name, (_, flag) in cases.items():
        assert f"error: {flag} {ro}/{name}: cannot write there (the file system is read-only)" in proc.stdout, \
            proc.stdout[-3000:]
    assert f"error: --output_dir {full}/sft: cannot write there (the disk is full)" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "Loading weights" not in proc.stdout

    merge = run_script("merge_with_lora.py", "--adapter_model_name", tiny_model, "--output_name",
                       str(tmp_path / "x"), check=False)  # (not an adapter: checked first)
    assert_user_error(merge, "not a LoRA adapter")
    regular = tmp_path / "a_file"
    regular.write_text("x")
    report = run_script("-m", "common.report", str(regular / "run"), check=False)
    assert_user_error(report, "cannot write there (a part of the path is a file, not a folder)")


@pytest.mark.slow
def test_no_permission_is_one_line_even_for_root(tiny_model, tmp_path):
    """Root ignores file modes; without the capability to (setpriv drops it), root meets them as any user does."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv here")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search"]
    proc = subprocess.run([*drop, sys.executable, *SFT, "--model_name_or_path", tiny_model, "--output_dir",
                           str(locked / "sft")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **OFFLINE_ENV})
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr and "setpriv" in proc.stderr:
        pytest.skip("setpriv may not drop capabilities here")
    assert_user_error(proc, f"--output_dir {locked / 'sft'}: cannot write there (permission denied)")


# ---------------------------------------------------------------------------------------------- paths and flags


def test_a_missing_local_model_is_named_at_once(tmp_path):
    (tmp_path / "runs").mkdir()
    # absolute, ./, ../, and relative with an existing parent (data/ is in the repository): local, never the Hub
    for name in (str(tmp_path / "runs" / "sft"), "./no/such/model", "../no-such-model", "data/no-such-model"):
        start = time.time()
        proc = run_script("training_sft.py", "--model_name_or_path", name, "--output_dir", str(tmp_path / "o"),
                          check=False)
        assert_user_error(proc, f"--model_name_or_path {name}: no such folder")
        assert time.time() - start < 60  # no Hub retries


def test_a_merge_whose_adapter_lost_its_base_names_base_model_name(tiny_model, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "moved"),
                                                              "task_type": "CAUSAL_LM", "peft_type": "LORA"}))
    proc = run_script("merge_with_lora.py", "--adapter_model_name", str(adapter), "--output_name",
                      str(tmp_path / "out"), check=False)
    assert_user_error(proc, str(tmp_path / "moved"), "moved or deleted", "--base_model_name")


def test_flags_suggest_and_yaml_errors_name_the_file(tmp_path):
    proc = run_script("training_rl.py", "--max_steps", "0", check=False)
    assert_user_error(proc, "--max_steps", "use --steps")
    proc = run_script("training_sft.py", "--lerning_rate", "1e-3", check=False)
    assert_user_error(proc, "did you mean --learning_rate")
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: many\n")
    proc = run_script("training_sft.py", "--config", str(config), check=False)
    assert_user_error(proc, f"--config {config}: key 'max_steps': 'many' is not a valid value")
    proc = run_script("training_sft.py", "--model_name_or_path", "unused", "--dataset_name", ".",
                      "--assistant_only_loss", "true", "--output_dir", str(tmp_path / "o"), check=False)
    assert_user_error(proc, "--assistant_only_loss needs conversations")


@pytest.mark.slow
def test_evaluate_interrupted_is_one_line(tiny_model, reward_model, tmp_path):
    out = str(tmp_path / "eval")
    proc = subprocess.Popen([sys.executable, "evaluate.py", "--models", f"a={tiny_model}", "--reward_model_name",
                             reward_model, "--num_prompts", "64", "--max_new_tokens", "64", "--output_dir", out],
                            cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # imports and models loaded: it is sampling (64 answers of up to 64 tokens take far longer)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (SIGINT); nothing")
    assert not os.path.isfile(os.path.join(out, "eval.json"))


@pytest.mark.slow
def test_a_run_stopped_after_its_last_checkpoint_saves_that_checkpoint_and_takes_no_step_more(tiny_model, tmp_path):
    """Interrupted between the last step's checkpoint and the final save: the same command again saves the
    checkpoint's weights as the final model (Trainer.train would have taken one step past --max_steps)."""
    from safetensors.torch import load_file

    out = str(tmp_path / "sft")
    cmd = [*SFT[:SFT.index("--max_steps")], "--max_steps", "3", "--save_freq", "3", "--eval_freq", "100",
           "--learning_rate", "1e-3", "--disable_tqdm", "true", "--model_name_or_path", tiny_model, "--output_dir", out]
    run_script(*cmd)
    for name in os.listdir(out):  # as if stopped before the final save: only the checkpoint and the run's records
        if name not in ("checkpoint-3", "run_args.yaml", "metrics.jsonl"):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    again = run_script(*cmd)
    assert "resuming from " in again.stdout and "no step left" in again.stdout
    assert max(m.get("step", 0) for m in read_metrics(out)) == 3
    assert not os.path.exists(os.path.join(out, "checkpoint-4"))
    final, checkpoint = (load_file(os.path.join(d, "adapter_model.safetensors"))
                         for d in (out, os.path.join(out, "checkpoint-3")))
    assert final.keys() == checkpoint.keys() and all(torch.equal(final[k], checkpoint[k]) for k in final)
