"""Stage 2 end to end on the tiny model: learning read back from the saved adapter, the evaluation report, flags,
config files, resume, an SFT adapter as the base, and bad input."""

import json
import math
import os

import pytest
import torch
import yaml

from common.outputs import read_metrics
from common.prompts import format_example
from conftest import assert_user_error, kill_after_checkpoint, mark_checkpoint, run_script

DATA = ["--dataset_name", ".", "--train_data_dir", "data/reward", "--eval_data_dir", "data/evaluation"]
# A random base needs a far higher learning rate than StackLLaMA's 2e-5 for a pretrained 7B model.
FAST = ["--max_length", "256", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
        "--logging_steps", "5", "--disable_tqdm", "true"]


def rm(model, out, *extra, check=True):
    return run_script("training_reward_model.py", "--model_name_or_path", model, *DATA, *FAST, "--output_dir", out,
                      *extra, check=check)


def eval_pairs(n=None):
    with open("data/evaluation/train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:n]
    return rows


def load_reward_model(base, adapter):
    """The reward model as a user would load it: plain transformers + peft, nothing from this project."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PeftModel.from_pretrained(model, adapter), tokenizer


def score_rows(model, tokenizer, rows, max_tokens=None):
    from common.reward import score_texts

    chosen = [format_example(r["question"], r["response_j"]) for r in rows]
    rejected = [format_example(r["question"], r["response_k"]) for r in rows]
    if max_tokens:  # the run drops pairs over --max_length; so must the check
        keep = [i for i in range(len(rows))
                if max(len(tokenizer(chosen[i] + tokenizer.eos_token)["input_ids"]),
                       len(tokenizer(rejected[i] + tokenizer.eos_token)["input_ids"])) <= max_tokens]
        chosen, rejected = [chosen[i] for i in keep], [rejected[i] for i in keep]
    return score_texts(model, tokenizer, chosen, 16), score_texts(model, tokenizer, rejected, 16)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pad", ["eos", "unk"])
def test_score_texts_gives_each_text_the_score_of_a_forward_of_it_alone(tiny_model, pad, padding_side):
    """common.reward.score_texts (the reward model's report, its stats and PPO's scores) against a plain unpadded
    forward of each text with its EOS: padding, batching and the EOS append. With pad = EOS (what the stages set
    when a tokenizer has none) the model reads the last token before the EOS; with another pad token, the EOS."""
    from transformers import AutoModelForSequenceClassification

    from common.modeling import load_tokenizer
    from common.reward import score_texts

    tokenizer = load_tokenizer(tiny_model, padding_side=padding_side)  # pad = EOS: the tiny tokenizer has none
    if pad == "unk":
        tokenizer.pad_token = tokenizer.unk_token
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (pad == "eos")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.mul_(50)  # scores far apart, so one read from another text or position would show
    texts = [format_example(r["question"], r["response_j"]) for r in eval_pairs(6)]
    lengths = [len(tokenizer(t + tokenizer.eos_token)["input_ids"]) for t in texts]
    assert len(set(lengths[:4])) > 1 and len(set(lengths[4:])) > 1  # both batches of 4 have padded rows
    scores = score_texts(model, tokenizer, texts, batch_size=4)
    alone = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt")["input_ids"]
            assert ids[0, -1].item() == tokenizer.eos_token_id
            alone.append(model(input_ids=ids).logits[0, 0].item())
    assert scores.shape == (len(texts),) and max(alone) - min(alone) > 1  # measured 21 to 23
    torch.testing.assert_close(scores, torch.tensor(alone), atol=1e-3, rtol=0)  # measured <= 1.5e-5 apart


@pytest.mark.slow
def test_reward_model_learns_and_the_saved_adapter_scores_the_same(tiny_model, tmp_path):
    out = str(tmp_path / "rm")
    # The score head and LoRA (r 8, all linear layers) on a random base learn the classic pairs (surface cues)
    # within 30 steps of 8 pairs, not the look-alike ones that need content (data/README.md): well above chance
    # overall, not near 1. Evaluation costs several training steps, so it runs only before training and at the end.
    proc = rm(tiny_model, out, "--max_steps", "30", "--eval_steps", "30", "--save_steps", "15",
              "--eval_first_step", "true", "--eval_subset", "120")
    assert "eval: 120 pairs; " in proc.stdout and "longer than --max_length 256 tokens dropped" in proc.stdout
    metrics = read_metrics(out)
    evals = {m["step"]: m["eval_accuracy"] for m in metrics if "eval_accuracy" in m}
    assert set(evals) == {0, 30} and evals[30] >= 0.65 and evals[0] < 0.6, evals  # learned, not luck of the head

    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "run_args.yaml", "metrics.jsonl",
            "README.md", "reward_stats.json", "eval_report.json", "eval_report.md", "checkpoint-15",
            "checkpoint-30"} <= files
    assert "training_args.bin" not in files and ".final-tmp" not in files
    adapter_config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (8, 32, 0.1)
    report = json.load(open(os.path.join(out, "eval_report.json")))
    assert report["accuracy"] >= 0.65 and report["accuracy_lookalike"] is not None

    # Read back with plain peft: the same accuracy, the same scores, a preferred answer above its rejected one.
    model, tokenizer = load_reward_model(tiny_model, out)
    r_j, r_k = score_rows(model, tokenizer, eval_pairs(120), max_tokens=256)
    assert len(r_j) == report["n_pairs"] and f"eval: 120 pairs; {120 - len(r_j)} longer" in proc.stdout
    accuracy = (r_j > r_k).float().mean().item()
    assert accuracy >= 0.65 and abs(accuracy - report["accuracy"]) < 1e-9
    assert abs(accuracy - evals[30]) < 0.02  # RewardTrainer averages per-batch accuracies; the last batch is smaller
    assert abs(r_j.mean().item() - report["chosen_scores"]["mean"]) < 1e-5
    assert abs(r_k.mean().item() - report["rejected_scores"]["mean"]) < 1e-5
    assert abs(r_j.std(unbiased=False).item() - report["chosen_scores"]["std"]) < 1e-5
    stats = json.load(open(os.path.join(out, "reward_stats.json")))
    assert abs(torch.cat([r_j, r_k]).mean().item() - stats["mean"]) < 1e-5
    for wrong in report["most_confidently_wrong"]:  # the report's own per-pair numbers
        assert wrong["chosen_score"] <= wrong["rejected_score"]

    card = open(os.path.join(out, "README.md")).read()
    assert ("Reward model" in card and tiny_model in card and "eval_accuracy" in card
            and "training_reward_model.py" in card)


@pytest.mark.slow
def test_stackllama_flags_run_unchanged(tiny_model, tmp_path):
    out = str(tmp_path / "rm-se")
    proc = run_script(
        "training_reward_model.py", f"--model_name={tiny_model}", "--tokenizer_name", tiny_model, *DATA,
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--learning_rate", "2e-5", "--weight_decay", "0.001", "--bf16", "false", "--num_train_epochs", "1",
        "--train_subset", "16", "--eval_subset", "8", "--gradient_checkpointing", "true", "--optim", "adamw_torch",
        "--lr_scheduler_type", "linear", "--max_length", "512", "--eval_first_step", "true", "--local_rank", "-1",
        "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--output_dir", out, "--disable_tqdm", "true",
        "--margin", "0.5", "--center_rewards_coefficient", "0.01",
    )
    assert "train: 16 pairs; 0 longer" in proc.stdout and "eval: 8 pairs" in proc.stdout
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert {m["step"] for m in metrics if "eval_loss" in m} == {0, 2, 4}
    args = yaml.safe_load(open(os.path.join(out, "run_args.yaml")))
    cfg = args["RewardConfig"]
    assert (cfg["per_device_train_batch_size"], cfg["per_device_eval_batch_size"],
            cfg["gradient_accumulation_steps"]) == (2, 4, 2)
    assert cfg["gradient_checkpointing"] is True and cfg["center_rewards_coefficient"] == 0.01
    assert args["ModelArguments"]["model_name_or_path"] == tiny_model and args["ScriptArguments"]["margin"] == 0.5
    assert json.load(open(os.path.join(out, "eval_report.json")))["n_pairs"] == 8
    assert os.path.isdir(os.path.join(out, "checkpoint-4"))


@pytest.mark.slow
def test_config_yaml_and_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(tiny_model, tmp_path):
    from safetensors.torch import load_file

    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    config = tmp_path / "run.yaml"
    # YAML keys may be Hugging Face names or StackLLaMA aliases; the command line overrides them.
    config.write_text(yaml.safe_dump({"model_name": tiny_model, "dataset_name": ".", "train_subset": 24,
                                      "eval_subset": 8, "max_steps": 99, "save_steps": 2, "eval_steps": 2,
                                      "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                                      "disable_tqdm": True}))
    run_script("training_reward_model.py", "--config", str(config), "--max_steps", "4", "--output_dir", full)
    args = yaml.safe_load(open(os.path.join(full, "run_args.yaml")))
    assert args["RewardConfig"]["max_steps"] == 4 and args["ScriptArguments"]["train_subset"] == 24
    assert args["RewardConfig"]["per_device_eval_batch_size"] == 4  # evaluation batches like training by default

    # The interrupted run: SIGKILL as soon as checkpoint-2 is in place, then resumed.
    kill_after_checkpoint(["training_reward_model.py", "--config", str(config), "--max_steps", "4",
                           "--output_dir", cut],
                          os.path.join(cut, "checkpoint-2"))
    assert not os.path.exists(os.path.join(cut, "adapter_config.json"))
    marker = mark_checkpoint(os.path.join(cut, "checkpoint-2"))
    run_script("training_reward_model.py", "--config", str(config), "--max_steps", "4", "--output_dir", cut,
               "--resume_from_checkpoint", "latest")
    assert os.path.isfile(marker), "checkpoint-2 was saved again: the run started over instead of resuming"
    assert [m["step"] for m in read_metrics(cut)] == [1, 2, 3, 4]
    a = load_file(os.path.join(full, "adapter_model.safetensors"))
    b = load_file(os.path.join(cut, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("score" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_an_sft_adapter_folder_is_a_valid_base(tiny_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = str(tmp_path / "sft")
    torch.manual_seed(0)
    causal = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                            LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", modules_to_save=["lm_head"],
                                       init_lora_weights=False))  # random, non-zero: the merge must show
    causal.save_pretrained(sft)
    out = str(tmp_path / "rm")
    rm(sft, out, "--max_steps", "2", "--train_subset", "16", "--eval_subset", "8")
    # The new adapter records the SFT adapter as its base (not the raw base, which would lose the SFT weights).
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == sft

    # Scores as reported = the SFT adapter merged into the classifier's backbone, then the reward adapter.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    merged = PeftModel.from_pretrained(base, sft, config=_without_lm_head(sft)).merge_and_unload()
    merged.config.pad_token_id = 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    r_j, _ = score_rows(PeftModel.from_pretrained(merged, out), tokenizer, eval_pairs(8), max_tokens=256)
    report = json.load(open(os.path.join(out, "eval_report.json")))
    assert abs(r_j.mean().item() - report["chosen_scores"]["mean"]) < 1e-5
    raw, _ = load_reward_model(tiny_model, out)
    raw_j, _ = score_rows(raw, tokenizer, eval_pairs(8), max_tokens=256)
    assert abs(raw_j.mean().item() - report["chosen_scores"]["mean"]) > 1e-3  # the SFT weights matter


def _without_lm_head(adapter):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(adapter)
    config.task_type, config.modules_to_save = None, None
    return config


def test_pair_report_math_on_a_hand_computed_case():
    from common.rm_eval import calibration, pair_report

    r_j, r_k = torch.tensor([2.0, 0.0, 1.0, 3.0]), torch.tensor([0.0, 1.0, 1.0, -2.0])
    report = pair_report(["q1", "q2", "q3", "q4"], ["aa", "b", "cccc", "dddddd"], ["a", "bbb", "c", "dd"], r_j, r_k)
    assert report["accuracy"] == 0.5 and report["ties"] == 1  # a tie counts as wrong
    assert report["mean_margin"] == pytest.approx((2 - 1 + 0 + 5) / 4)
    assert [w["question"] for w in report["most_confidently_wrong"]] == ["q2", "q3"]  # the most wrong first
    assert [b["count"] for b in report["accuracy_by_abs_margin"]] == [1, 0, 1, 1, 1]  # |margin| 0, 1, 2, 5
    assert report["accuracy_when_rejected_is_longer"] == {"count": 1, "accuracy": 0.0}
    assert report["chosen_scores"] == {"mean": 1.5, "std": pytest.approx(math.sqrt(1.25)), "n": 4}
    # Pearson of scores [2, 0, 1, 3] with lengths [2, 1, 4, 6]
    assert report["length_correlation"]["chosen"] == pytest.approx(
        float(torch.corrcoef(torch.tensor([[2.0, 0, 1, 3], [2.0, 1, 4, 6]]))[0, 1]))

    # p = 0.75 for 4 pairs: bins [0.7, 0.8) (observed 1) and [0.2, 0.3) (observed 0): perfectly calibrated would
    # need 0.75 / 0.25; the error is 0.25 in each.
    ece, table = calibration(torch.full((4,), 0.75))
    assert ece == pytest.approx(0.25) and table[7]["count"] == 4 and table[2]["observed"] == 0.0
    ece, _ = calibration(torch.tensor([0.9] * 9 + [0.1]))  # 9 of 10 right at p = 0.9 (or 0.1 reversed): calibrated
    assert ece == pytest.approx(0.0, abs=1e-6)


def test_pair_report_accuracy_by_kind_and_on_the_look_alike_pairs():
    from common.rm_eval import pair_report, report_markdown

    r_j, r_k = torch.tensor([2.0, 0.0, 1.0, 3.0, 1.0]), torch.tensor([0.0, 1.0, 0.5, -2.0, 1.0])
    kinds = ["lookalike_wrong_names", "lookalike_wrong_names", "lookalike_broken", "dismissive", "lookalike_broken"]
    report = pair_report(["q"] * 5, ["a"] * 5, ["b"] * 5, r_j, r_k, kinds=kinds)
    # right: pairs 0, 2, 3; wrong: 1 (lower), 4 (a tie)
    assert report["accuracy_by_kind"] == {"dismissive": {"count": 1, "accuracy": 1.0},
                                          "lookalike_broken": {"count": 2, "accuracy": 0.5},
                                          "lookalike_wrong_names": {"count": 2, "accuracy": 0.5}}
    assert report["n_lookalike"] == 4 and report["accuracy_lookalike"] == 0.5
    assert "4 look-alike pairs" in report_markdown(report)
    assert "accuracy_lookalike" not in pair_report(["q"], ["a"], ["b"], r_j[:1], r_k[:1])  # no kinds: not reported


def test_bad_data_names_the_missing_field(tmp_path, capsys):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"question": "q", "response_j": "a"}) + "\n")
    message = _user_error(["--model_name_or_path", "does/not-exist-locally", "--dataset_name", str(bad),
                           "--output_dir", str(tmp_path / "o")], capsys)
    assert "response_k" in message and str(bad) in message


@pytest.mark.parametrize("flags, needle", [
    (["--learning_rate", "0"], "--learning_rate"),
    (["--learning_rate", "-1e-5"], "--learning_rate"),
    (["--max_length", "0"], "--max_length"),
    (["--max_steps", "0"], "--max_steps"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--model_name", "./no/such/folder"], "./no/such/folder"),
])
def test_bad_flags_give_one_clear_message(tiny_model, tmp_path, capsys, flags, needle):
    assert needle in _user_error(["--model_name_or_path", tiny_model, *DATA, "--output_dir", str(tmp_path / "o"),
                                  *flags], capsys)
    assert not os.path.exists(tmp_path / "o" / "adapter_config.json")


def test_an_existing_final_model_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    message = _user_error(["--model_name_or_path", tiny_model, *DATA, "--output_dir", str(out)], capsys)
    assert "--overwrite_output_dir" in message and (out / "adapter_config.json").read_text() == "{}"


def test_a_bad_flag_exits_without_traceback(tmp_path):
    proc = run_script("training_reward_model.py", "--model_name", "m", "--learning_rate", "-1",
                      "--output_dir", str(tmp_path), check=False)
    assert_user_error(proc, "--learning_rate")
    proc = run_script("training_reward_model.py", "--help")
    for flag in ["--model_name", "--model_name_or_path", "--tokenizer_name", "--train_data_dir", "--eval_data_dir",
                 "--train_subset", "--eval_subset", "--margin", "--center_rewards_coefficient", "--deepspeed",
                 "--eval_first_step", "--use_peft", "--load_in_4bit", "--config", "--resume_from_checkpoint"]:
        assert flag in proc.stdout, flag


def _user_error(args, capsys) -> str:
    """Run the script in-process (no subprocess re-importing torch and transformers per case) and return its one
    `error:` message."""
    import training_reward_model
    from common.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(lambda: training_reward_model.main(*training_reward_model.parse(args)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # may begin with a progress bar of `datasets`
    assert "Traceback" not in err and sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    return err[err.index("error: "):]
