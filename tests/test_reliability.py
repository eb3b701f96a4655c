"""Reliability: non-finite values never reach the weights, incomplete checkpoints are never resumed from,
and a run killed with SIGKILL right after a checkpoint resumes to the same weights."""

import json
import os

import pytest
import torch

from common.cli import UserError, run
from common.outputs import find_checkpoint, read_metrics
from conftest import kill_after_checkpoint, mark_checkpoint, max_weight_diff, run_script


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    for step, state in ((2, {"global_step": 2}), (4, {"global_step": 4}), (6, None), (8, "half")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state == "half":
            (folder / "trainer_state.json").write_text('{"global_st')  # killed while writing
        elif state:
            (folder / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoint-10.tmp").mkdir()
    assert find_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-4")
    assert find_checkpoint(str(tmp_path), "true") == str(tmp_path / "checkpoint-4")
    assert find_checkpoint(str(tmp_path), None) is None
    with pytest.raises(UserError, match="incomplete"):
        find_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-6"))
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoint(str(tmp_path / "checkpoint-2"), "latest")


@pytest.mark.slow
def test_nan_loss_in_sft_is_skipped_counted_and_repeated_ones_stop_the_run(tiny_model, tmp_path, monkeypatch, capsys):
    from trl import SFTTrainer

    import training_sft

    real = SFTTrainer.compute_loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # NaN at optimizer step 3, then from step 6 on
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] == 3 or calls["n"] >= 6:
            out = (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")
        return out

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    out = str(tmp_path / "sft")
    args = ["--model_name_or_path", tiny_model, "--dataset_name", ".", "--subset", "data/finetune",
            "--size_valid_set", "0", "--seq_length", "64", "--batch_size", "2", "--max_steps", "20",
            "--save_freq", "4", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--output_dir", out]
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: training_sft.main(*training_sft.parse(args)))
    assert exit_info.value.code == 2 and "non-finite" in capsys.readouterr().err
    metrics = read_metrics(out)
    assert [m["skipped_steps"] for m in metrics if "loss" in m][:5] == [0, 0, 1, 1, 1]
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))  # no final model from a broken run
    from safetensors.torch import load_file

    weights = load_file(os.path.join(out, "checkpoint-4", "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_nan_reward_in_ppo_is_skipped_and_repeated_ones_stop_with_the_checkpoint_intact(tiny_model, tmp_path,
                                                                                        monkeypatch, capsys, algorithm):
    from test_ppo import FAST, _save_reward_model

    import common.reward
    import training_rl

    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    real = common.reward.score_texts
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # step 2's scores are NaN, then every step from 4 on
        calls["n"] += 1
        scores = real(*args, **kwargs)
        return scores * float("nan") if calls["n"] == 2 or calls["n"] >= 4 else scores

    monkeypatch.setattr(common.reward, "score_texts", poisoned)
    # An experiment tracker (`--report_to`), recording what the run tells it: the stop must end its run, as the
    # end of training does, or a notebook that carries on leaves it open.
    from accelerate.tracking import GeneralTracker

    seen = {"log": [], "finish": 0}

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            seen["config"] = values

        def log(self, values, step=None, **kwargs):
            seen["log"].append(step)

        def finish(self):
            seen["finish"] += 1

    real_accelerator = training_rl.make_accelerator
    monkeypatch.setattr(training_rl, "make_accelerator", lambda a, trackers=None: real_accelerator(
        a, [Recorder()] if trackers == ["recorder"] else trackers))
    out = str(tmp_path / "ppo")
    args = ["--model_name", tiny_model, "--reward_model_name", rm, *FAST, "--steps", "80", "--save_freq", "1",
            "--output_dir", out, "--algorithm", algorithm, "--report_to", "recorder"]
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: training_rl.main(*training_rl.parse(args)))
    assert exit_info.value.code == 2 and "non-finite" in capsys.readouterr().err
    assert seen["log"] == [1, 2, 3, 4, 5, 6] and seen["finish"] == 1 and seen["config"]["algorithm"] == algorithm
    metrics = read_metrics(out)
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 2, 3, 4]
    # a skipped step has no losses (NaN, written as null) and took no optimizer step; a good one has both
    assert metrics[1]["loss/policy"] is None and metrics[1]["ppo/updates"] == 0
    assert isinstance(metrics[2]["loss/policy"], float) and metrics[2]["ppo/updates"] > 0
    # A skipped step leaves the weights exactly as they were.
    from safetensors.torch import load_file

    ck = {n: load_file(os.path.join(out, f"checkpoint-{n}", "adapter_model.safetensors")) for n in (1, 2, 3, 5)}
    assert all(torch.equal(ck[1][k], ck[2][k]) for k in ck[1])
    assert any(not torch.equal(ck[2][k], ck[3][k]) for k in ck[2])  # step 3 was a good one
    assert all(torch.equal(ck[3][k], ck[5][k]) and torch.isfinite(ck[5][k]).all() for k in ck[3])
    assert not os.path.exists(os.path.join(out, "checkpoint-6"))  # the run stopped at step 6, before saving
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))


@pytest.mark.slow
def test_a_checkpoint_cut_short_is_left_as_tmp_and_never_resumed_from(tiny_model, tmp_path, monkeypatch):
    """A save that dies half-way (here: an error once the weights and optimizer are written) leaves no
    `checkpoint-N` folder, only `checkpoint-N.tmp`; `latest` resumes from the one before, the next save of that
    step replaces the leftover, and `--save_total_limit` rotates only complete checkpoints."""
    import transformers

    import training_sft

    real = transformers.Trainer._save_rng_state
    crashed = []

    def crash_at_step_6(self, output_dir):
        if self.state.global_step == 6 and not crashed:
            crashed.append(output_dir)
            raise OSError("disk full (simulated)")
        return real(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_rng_state", crash_at_step_6)
    out = str(tmp_path / "sft")
    args = ["--model_name_or_path", tiny_model, "--dataset_name", ".", "--subset", "data/finetune",
            "--size_valid_set", "0", "--seq_length", "64", "--batch_size", "2", "--max_steps", "8",
            "--save_freq", "2", "--save_total_limit", "2", "--learning_rate", "1e-3", "--disable_tqdm", "true",
            "--output_dir", out]
    with pytest.raises(OSError, match="disk full"):
        run(lambda: training_sft.main(*training_sft.parse(args)))
    assert crashed == [os.path.join(out, "checkpoint-6.tmp", "checkpoint-6")]
    assert sorted(os.listdir(crashed[0])) and os.path.isfile(os.path.join(crashed[0], "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(crashed[0], "trainer_state.json"))
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6.tmp"]  # nothing named checkpoint-6
    assert find_checkpoint(out, "latest") == os.path.join(out, "checkpoint-4")
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert os.path.isfile(os.path.join(out, "checkpoint-4", name)), name

    # The resumed run trains the steps after checkpoint-4 only: a run that started over would train from step 0, and
    # (deterministic) end on the same weights, checkpoints and metrics' step list.
    trained = []
    real_step = transformers.Trainer.training_step

    def counted(self, *a, **k):
        trained.append(self.state.global_step)
        return real_step(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "training_step", counted)
    run(lambda: training_sft.main(*training_sft.parse([*args, "--resume_from_checkpoint", "latest"])))
    assert sorted(set(trained)) == [4, 5, 6, 7], trained  # global_step before each of the optimizer steps 5 to 8
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    assert names == ["checkpoint-6", "checkpoint-8"]  # the leftover replaced, the oldest rotated out
    assert json.load(open(os.path.join(out, "checkpoint-8", "trainer_state.json")))["global_step"] == 8
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 9))
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))


@pytest.mark.slow
def test_sft_killed_after_a_checkpoint_resumes_to_the_same_weights(tiny_model, tmp_path):
    args = ["training_sft.py", "--model_name_or_path", tiny_model, "--dataset_name", ".", "--subset", "data/finetune",
            "--size_valid_set", "20", "--seq_length", "64", "--batch_size", "2", "--max_steps", "16",
            "--save_freq", "8", "--eval_freq", "8", "--learning_rate", "1e-3", "--disable_tqdm", "true"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_script(*args, "--output_dir", full)
    kill_after_checkpoint([*args, "--output_dir", cut], os.path.join(cut, "checkpoint-8"))
    marker = mark_checkpoint(os.path.join(cut, "checkpoint-8"))
    run_script(*args, "--output_dir", cut, "--resume_from_checkpoint", "latest")
    assert os.path.isfile(marker), "checkpoint-8 was saved again: the run started over instead of resuming"
    assert [m["step"] for m in read_metrics(cut)] == list(range(1, 17))
    assert max_weight_diff(full, cut, "adapter_model.safetensors") < 1e-5


@pytest.mark.slow
def test_ppo_killed_after_a_checkpoint_resumes_to_the_same_weights(tiny_model, tmp_path):
    from test_ppo import FAST, _save_reward_model

    rm = _save_reward_model(tiny_model, str(tmp_path / "rm"))
    args = ["training_rl.py", "--model_name", tiny_model, "--reward_model_name", rm, *FAST, "--steps", "32",
            "--save_freq", "2"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_script(*args, "--output_dir", full)
    kill_after_checkpoint([*args, "--output_dir", cut], os.path.join(cut, "checkpoint-2"))
    marker = mark_checkpoint(os.path.join(cut, "checkpoint-2"))
    before = read_metrics(cut)[:2]  # wall-clock timings: a run that started over would write other ones
    run_script(*args, "--output_dir", cut, "--resume_from_checkpoint", "latest")
    assert os.path.isfile(marker), "checkpoint-2 was saved again: the run started over instead of resuming"
    assert read_metrics(cut)[:2] == before
    assert [m["step"] for m in read_metrics(cut)] == [1, 2, 3, 4]
    assert max_weight_diff(full, cut, "adapter_model.safetensors") < 1e-5
    assert max_weight_diff(full, cut, "value_head.safetensors") < 1e-5
