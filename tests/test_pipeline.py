"""The whole chain on the sample data with the tiny model (scripts/run_pipeline.sh), as the README runs it,
with fewer steps; and the example run configs in configs/ parse."""

import glob
import json
import os
import subprocess

import pytest
import yaml

from common.outputs import read_metrics
from conftest import OFFLINE_ENV, ROOT, TORCHRUN, run_script


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline") / "run")
    env = {**os.environ, **OFFLINE_ENV, "OUT": out, "SFT_ARGS": "--max_steps 100 --disable_tqdm true",
           "RM_ARGS": "--max_steps 40 --disable_tqdm true",
           "PPO_ARGS": "--steps 480 --save_freq 1000 --disable_tqdm true"}
    proc = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_pipeline_shows_that_rlhf_worked(pipeline):
    out, stdout = pipeline
    summary = json.load(open(os.path.join(out, "summary.json")))
    for key in ("sft_eval_loss_before", "sft_eval_loss_after", "rm_eval_accuracy", "ppo_score_first", "ppo_score_last",
                "ppo_kl_last", "seconds_per_stage"):
        assert summary[key] is not None, key
    assert summary["sft_eval_loss_after"] < summary["sft_eval_loss_before"]
    assert summary["rm_eval_accuracy"] >= 0.9
    assert summary["ppo_score_last"] > summary["ppo_score_first"] + 0.5, summary
    assert 0 <= summary["ppo_kl_last"] < 20 and summary["ppo_kl_max"] < 30  # bounded by the KL penalty
    assert ({"SFT", "reward model", "PPO", "merge SFT", "merge reward model", "merge PPO"}
            <= set(summary["seconds_per_stage"]))
    assert "RLHF pipeline summary" in stdout and "rose: yes" in stdout


@pytest.mark.slow
def test_ppo_on_two_processes_learns_like_one_with_the_same_global_batch(pipeline):
    """The pipeline's PPO stage again under torchrun: 2 processes x 8 prompts (minibatches of 2) against the
    pipeline's 1 process x 16 (minibatches of 4), from the same SFT policy and reward model."""
    out, _ = pipeline
    two = os.path.join(os.path.dirname(out), "ppo_two_processes")
    same = ["--gradient_accumulation_steps", "1", "--ppo_epochs", "2", "--learning_rate", "3e-4",
            "--output_min_length", "16", "--output_max_length", "32", "--init_kl_coef", "0.1", "--target", "4",
            "--horizon", "500"]
    one_args = yaml.safe_load(open(os.path.join(out, "ppo", "run_args.yaml")))["PPOConfig"]
    for flag, value in zip(same[::2], same[1::2]):  # the one-process run used these too (scripts/run_pipeline.sh)
        assert float(one_args[flag[2:]]) == float(value), flag
    assert (one_args["batch_size"], one_args["mini_batch_size"], one_args["steps"]) == (16, 4, 480)
    run_script(*TORCHRUN, "--master_port", "29573", "training_rl.py",
               "--model_name", os.path.join(out, "sft_merged"), "--reward_model_name", os.path.join(out, "rm_merged"),
               "--dataset_name", ".", "--subset", "data/rl", *same, "--steps", "240", "--batch_size", "8",
               "--mini_batch_size", "2", "--save_freq", "1000", "--disable_tqdm", "true", "--output_dir", two,
               timeout=900)
    runs = {name: read_metrics(path) for name, path in (("one", os.path.join(out, "ppo")), ("two", two))}
    assert ([m["episodes"] for m in runs["two"]] == [m["episodes"] for m in runs["one"]]
            == [16 * (i + 1) for i in range(30)])
    fifth = {}
    for name, metrics in runs.items():
        scores = [m["objective/scores"] for m in metrics]
        fifth[name] = (sum(scores[:6]) / 6, sum(scores[-6:]) / 6)
        assert fifth[name][1] > fifth[name][0] + 1.0, (name, fifth)  # both learn (measured: +2.9 and +3.1)
        assert max(m["objective/kl"] for m in metrics) < 30, name  # both held by the KL penalty (measured: 7.1)
    assert abs(fifth["one"][1] - fifth["two"][1]) < 0.75, fifth  # and end in the same place (measured: 1.39 vs 1.24)


@pytest.mark.slow
def test_the_reward_model_merges_with_another_cpus_kernels(pipeline, tmp_path):
    """On CI's machine the merge moved one probe score of the demo reward model by 4e-2 (its massive activations
    amplify rounding) and the logit-only check refused it. MKL and oneDNN capped at AVX2 give such a machine's
    kernels here (on this AVX-512 machine: 8.6e-4, above the 1.9e-4 logit bound). The layer check decides."""
    out, _ = pipeline
    merged = tmp_path / "rm_merged"
    run_script("merge_with_lora.py", "--adapter_model_name", os.path.join(out, "rm"), "--output_name", merged,
               env={"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, timeout=300)
    metrics = json.loads(open(merged / "metrics.jsonl").readline())
    assert metrics["verify_layers_checked"] == 4 * 7 + 1 and metrics["verify_worst_layer_share"] < 0.2, metrics


@pytest.mark.slow
def test_pipeline_writes_report_plots_and_plain_models(pipeline):
    out, _ = pipeline
    report = open(os.path.join(out, "report.md")).read()
    assert "eval accuracy" in report and report.count("| score ") == 6  # three questions, each scored before and after
    answers = json.load(open(os.path.join(out, "answers.json")))
    assert len(answers) == 3 and all({"sft_merged", "final"} <= set(a) for a in answers)
    for png in ("sft_loss.png", "rm_accuracy.png", "ppo.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(4) == b"\x89PNG", png
    for merged in ("sft_merged", "rm_merged", "final"):
        assert os.path.isfile(os.path.join(out, merged, "model.safetensors")), merged
        assert not os.path.isfile(os.path.join(out, merged, "adapter_config.json"))


@pytest.mark.slow
def test_pipeline_rerun_skips_finished_stages(pipeline):
    out, _ = pipeline
    env = {**os.environ, **OFFLINE_ENV, "OUT": out}
    proc = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("(done already: skipped)") == 7, proc.stdout[-2000:]


def test_a_failing_stage_is_named(tmp_path):
    env = {**os.environ, **OFFLINE_ENV, "OUT": str(tmp_path), "BASE_MODEL": str(tmp_path / "missing-model")}
    proc = subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "pipeline stage 'SFT' failed" in proc.stderr


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "runs", "*.yaml"))))
def test_example_run_configs_parse(path):
    import training_reward_model
    import training_rl
    import training_sft

    script = {"sft": training_sft, "rm": training_reward_model,
              "ppo": training_rl}[os.path.basename(path).split("_")[0]]
    parsed = script.parse(["--config", path])
    values = {k: v for obj in parsed for k, v in vars(obj).items()}
    for key, _value in yaml.safe_load(open(path)).items():
        assert key in values or key in ("seq_length", "batch_size", "num_warmup_steps", "eval_freq", "save_freq"), key


def test_accelerate_configs_are_valid_yaml():
    for path in glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml")):
        config = yaml.safe_load(open(path))
        assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP", "MULTI_CPU"), path
