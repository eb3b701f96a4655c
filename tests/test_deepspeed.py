"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DeepSpeed's CPU accelerator, gloo), launched as a user would
(`accelerate launch --config_file ...`).

- SFT and the reward model under ZeRO-2 and ZeRO-3, two processes: the same loss curve, gradient norms, evaluation
  loss and final adapter as a two-process DDP run with the same global batch; one main process prints and saves;
  every process writes its shard of the optimizer state. SFT: a run resumed from a checkpoint ends on exactly the
  uninterrupted run's adapter. Reward model: the evaluation report (scored on both processes after training)
  matches DDP's.
- PPO, two processes: the same weights as a two-process DDP run, and exact resume from a checkpoint's DeepSpeed
  state (every process's shard of the optimizer state).

DeepSpeed is in requirements-dev.txt (its sdist builds in pip's isolated environment without torch: no compiled
ops are built at install time). On CPU it compiles one op at its first start (the shared-memory all-reduce, with
g++ and ninja, cached in ~/.cache/torch_extensions): the first test here also pays for that compilation.
"""

import json
import os

import pytest

from common.outputs import read_metrics
from conftest import TORCHRUN, mark_checkpoint, max_weight_diff, run_script

ENV = {"DS_ACCELERATOR": "cpu"}  # what DeepSpeed falls back to without a GPU anyway, minus the warning

# ZeRO and DDP with the same global batch agree to float rounding; these bounds leave at least ten times that as
# margin and still sit far below what a different batch order changes (figures: docs/ppo.md, "Test tolerances").
LOSS_TOL, GRAD_NORM_TOL, ADAPTER_TOL = 1e-4, 1e-3, 5e-4

SFT = ["training_sft.py", "--dataset_name", ".", "--subset", "data/finetune", "--size_valid_set", "16",
       "--seq_length", "64", "--batch_size", "4", "--max_steps", "12", "--eval_freq", "12", "--save_freq", "6",
       "--learning_rate", "3e-3", "--num_warmup_steps", "1", "--lora_modules_to_save", "lm_head",
       "--disable_tqdm", "true"]
RM = ["training_reward_model.py", "--dataset_name", ".", "--max_length", "256", "--per_device_train_batch_size", "4",
      "--learning_rate", "1e-3", "--max_steps", "6", "--eval_steps", "6", "--save_steps", "3", "--eval_subset", "40",
      "--logging_steps", "1", "--disable_tqdm", "true"]
STAGES = {"sft": (SFT, 29661), "rm": (RM, 29662)}  # command, DDP's port

PPO = ["--dataset_name", ".", "--subset", "data/rl", "--batch_size", "4", "--mini_batch_size", "1",
       "--gradient_accumulation_steps", "2", "--ppo_epochs", "2", "--output_min_length", "6",
       "--output_max_length", "12", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--steps", "16",
       "--save_freq", "2"]


def _config(tmp_path, stage: int, processes: int = 1, port: int = 29650) -> str:
    path = tmp_path / f"zero{stage}_{processes}proc.yaml"
    path.write_text(f"""compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: {stage}
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: {'true' if stage == 3 else 'false'}
  zero3_save_16bit_model: true
mixed_precision: 'no'
num_machines: 1
num_processes: {processes}
main_process_port: {port + stage}
use_cpu: false
""")
    return str(path)


def _series(output_dir: str, key: str) -> list[float]:
    return [m[key] for m in read_metrics(output_dir) if key in m]


def _json(output_dir: str, name: str) -> dict:
    with open(os.path.join(output_dir, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ddp_runs(tiny_model, tmp_path_factory):
    """Each stage's two-process DDP run (torchrun, gloo), made when a test first asks for it."""
    done = {}

    def get(name: str) -> str:
        if name not in done:
            command, port = STAGES[name]
            out = str(tmp_path_factory.mktemp(f"ddp_{name}") / "out")
            run_script(*TORCHRUN, "--master_port", str(port), command[0], "--model_name_or_path", tiny_model,
                       *command[1:], "--output_dir", out)
            done[name] = out
        return done[name]

    return get


def _zero_run(tiny_model, tmp_path, name: str, stage: int) -> tuple[list, str]:
    """A two-process run of stage `name` under ZeRO-`stage`: its launch command and output folder."""
    command = STAGES[name][0]
    launch = ["-m", "accelerate.commands.launch", "--config_file", _config(tmp_path, stage, processes=2, port=29670),
              command[0], "--model_name_or_path", tiny_model, *command[1:]]
    out = str(tmp_path / "full")
    proc = run_script(*launch, "--output_dir", out, env=ENV, timeout=900)
    assert proc.stdout.count("saved to") == 1  # one main process: accelerate counts both processes
    return launch, out


def _assert_matches(ddp: str, out: str) -> None:
    """The same run as DDP's: every logged step, the evaluation and the final adapter."""
    for key, tol in (("loss", LOSS_TOL), ("eval_loss", LOSS_TOL)):
        a, b = _series(ddp, key), _series(out, key)
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < tol, (key, a, b)
    a, b = _series(ddp, "grad_norm"), _series(out, "grad_norm")
    assert len(a) == len(b) and max(abs(x - y) / x for x, y in zip(a, b)) < GRAD_NORM_TOL, (a, b)
    assert max_weight_diff(ddp, out, "adapter_model.safetensors") < ADAPTER_TOL


def _assert_sharded_checkpoint(checkpoint: str, step: int) -> None:
    """DeepSpeed's state: every process's shard of the optimizer state, and its RNG state; and the adapter."""
    for rank in (0, 1):
        shard = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        assert os.path.isfile(os.path.join(checkpoint, f"global_step{step}", shard))
        assert os.path.isfile(os.path.join(checkpoint, f"rng_state_{rank}.pth"))
    assert os.path.isfile(os.path.join(checkpoint, "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sft_two_processes_under_zero_match_ddp_and_resume_exactly(tiny_model, ddp_runs, tmp_path, stage):
    ddp = ddp_runs("sft")
    launch, full = _zero_run(tiny_model, tmp_path, "sft", stage)
    _assert_matches(ddp, full)
    checkpoint = os.path.join(full, "checkpoint-6")
    _assert_sharded_checkpoint(checkpoint, 6)

    # What a crash right after checkpoint-6 leaves, then resumed: exactly the uninterrupted run.
    cut = str(tmp_path / "cut")
    os.makedirs(cut)
    os.rename(checkpoint, os.path.join(cut, "checkpoint-6"))
    with open(os.path.join(full, "metrics.jsonl")) as f, open(os.path.join(cut, "metrics.jsonl"), "w") as g:
        g.write(f.read())  # the resumed run drops the lines after its checkpoint itself
    marker = mark_checkpoint(os.path.join(cut, "checkpoint-6"))
    run_script(*launch, "--output_dir", cut, "--resume_from_checkpoint", "latest", env=ENV, timeout=900)
    assert os.path.isfile(marker), "checkpoint-6 was saved again: the run started over instead of resuming"
    assert max_weight_diff(full, cut, "adapter_model.safetensors") == 0.0
    assert _series(cut, "loss") == _series(full, "loss")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_reward_model_two_processes_under_zero_match_ddp(tiny_model, ddp_runs, tmp_path, stage):
    """Resume goes through the same Trainer code as SFT's (tested above), so it is not repeated here."""
    ddp = ddp_runs("rm")
    _, out = _zero_run(tiny_model, tmp_path, "rm", stage)
    _assert_matches(ddp, out)
    _assert_sharded_checkpoint(os.path.join(out, "checkpoint-3"), 3)
    # The report scores the evaluation pairs after training, split over both processes (ZeRO-3: sharded weights).
    for key in ("mean", "std"):  # rounding-level agreement with DDP
        assert abs(_json(ddp, "reward_stats.json")[key] - _json(out, "reward_stats.json")[key]) < 1e-5, key
    a, b = _json(ddp, "eval_report.json"), _json(out, "eval_report.json")
    assert (a["n_pairs"], a["accuracy"]) == (b["n_pairs"], b["accuracy"])
    assert abs(a["mean_margin"] - b["mean_margin"]) < 1e-5


@pytest.fixture(scope="module")
def ppo_models(tiny_model, tmp_path_factory):
    from test_ppo import _save_reward_model

    rm = _save_reward_model(tiny_model, str(tmp_path_factory.mktemp("rm") / "rm"))
    ddp = str(tmp_path_factory.mktemp("ddp_ppo") / "out")
    run_script(*TORCHRUN, "--master_port", "29663", "training_rl.py", "--model_name", tiny_model,
               "--reward_model_name", rm, *PPO, "--output_dir", ddp)
    return tiny_model, rm, ddp


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_ppo_two_processes_under_zero_match_ddp_and_resume_exactly(ppo_models, tmp_path, stage):
    tiny, rm, ddp = ppo_models
    launch = ["-m", "accelerate.commands.launch", "--config_file", _config(tmp_path, stage, processes=2),
              "training_rl.py", "--model_name", tiny, "--reward_model_name", rm, *PPO]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    proc = run_script(*launch, "--output_dir", full, env=ENV, timeout=900)
    assert proc.stdout.count("saved to") == 1
    assert [m["episodes"] for m in read_metrics(full)] == [8, 16, 24, 32]  # 4 prompts a step on each process
    # ZeRO-2/3 and DDP reach the same adapter and value head up to float rounding (docs/ppo.md, "Test tolerances")
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert max_weight_diff(ddp, full, name) < 1e-4, name
    # accelerate's save_state under DeepSpeed: the engine's own files (ZeRO optimizer shards), no optimizer.bin
    for rank in (0, 1):
        shard = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        assert os.path.isfile(os.path.join(full, "checkpoint-2", "pytorch_model", shard))
    assert not os.path.exists(os.path.join(full, "checkpoint-2", "optimizer.bin"))

    # What a crash right after checkpoint-2 leaves, then resumed: the same weights as the uninterrupted run.
    os.makedirs(cut)
    os.rename(os.path.join(full, "checkpoint-2"), os.path.join(cut, "checkpoint-2"))
    with open(os.path.join(full, "metrics.jsonl")) as f, open(os.path.join(cut, "metrics.jsonl"), "w") as g:
        g.writelines(f.readlines()[:2])
    marker = mark_checkpoint(os.path.join(cut, "checkpoint-2"))
    run_script(*launch, "--output_dir", cut, "--resume_from_checkpoint", "latest", env=ENV, timeout=900)
    assert os.path.isfile(marker), "checkpoint-2 was saved again: the run started over instead of resuming"
    assert read_metrics(cut)[:2] == read_metrics(full)[:2]  # kept: a run that started over writes other timings
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert max_weight_diff(full, cut, name) == 0.0, name
