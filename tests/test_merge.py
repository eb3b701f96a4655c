"""merge_with_lora.py on tiny adapters built here with peft: exact merges (causal LM and reward model with its trained
`score` head), the verification, the output folder, and every refusal."""

import json
import os

import pytest
import torch

from common.cli import UserError, run
from conftest import assert_user_error, run_script
from merge_with_lora import main, parse

TEXTS = ["Question: How do I undo a commit?\n\nAnswer: git reset --soft HEAD~1 keeps the changes staged.",
         "Question: Tabs or spaces?\n\nAnswer: Spaces."]


def randomize(model, *names) -> None:
    """Non-zero LoRA B (and trained-looking `score` copy), so the adapter really changes the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.normal_(0, 0.05)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """A causal-LM adapter (no tokenizer of its own) and a reward-model adapter (own tokenizer, reward_stats.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    causal = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                            LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    randomize(causal, "lora_B")
    causal.save_pretrained(root / "causal")

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.eos_token
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = get_peft_model(rm, LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear"))
    randomize(rm, "lora_B", "score.modules_to_save")
    rm.save_pretrained(root / "reward")
    tok.model_max_length = 77  # marks the adapter's own tokenizer
    tok.save_pretrained(root / "reward")
    (root / "reward" / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    return {"causal": str(root / "causal"), "reward": str(root / "reward")}


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A base of another hidden size: the adapters do not fit it."""
    from common.tiny_model import main as build

    return build(["--output_dir", str(tmp_path_factory.mktemp("other") / "model"), "--hidden_size", "128"])


def merge(*argv):
    main(*parse([str(a) for a in argv]))


def leftovers(out) -> list[str]:
    """The output folder and any temporary sibling of it."""
    parent, name = os.path.split(str(out))
    return [n for n in os.listdir(parent) if n == name or n.startswith(name + ".")]


def batch(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(TEXTS, return_tensors="pt", padding=True)


def test_causal_merge_matches_base_plus_adapter(tiny_model, adapters, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    merge("--adapter_model_name", adapters["causal"], "--output_name", out)  # base read from adapter_config.json
    printed = capsys.readouterr().out
    assert "verify: max |merged - (base + adapter)|" in printed and "saved to" in printed
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "run_args.yaml",
            "metrics.jsonl"} <= files
    assert "adapter_config.json" not in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert leftovers(out) == ["merged"]

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert type(merged).__name__ == "LlamaForCausalLM"
    b = batch(out)
    mask = b["attention_mask"].bool()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapters["causal"]).eval()
    with torch.no_grad():
        got, want = merged(**b).logits[mask], reference(**b).logits[mask]
        with reference.disable_adapter():
            untouched = reference(**b).logits[mask]
    assert (got - want).abs().max() < 1e-4
    assert (got - untouched).abs().max() > 1e-2  # the merge really changed the model

    # The tokenizer is the base's (this adapter has none), with a pad token; the card records the check.
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    diff = json.loads(open(out / "metrics.jsonl").readline())["verify_max_abs_diff"]
    assert diff < 1e-4
    card = open(out / "README.md").read()
    for needle in ("verify_max_abs_diff", f"{diff:.4g}", adapters["causal"], tiny_model, "CAUSAL_LM", "float32"):
        assert needle in card
    print(f"causal LM merge: max abs diff {diff:.3g}")


def test_reward_merge_keeps_the_trained_score_head(tiny_model, adapters, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "rm"
    merge("--adapter_model_name", adapters["reward"], "--base_model_name", tiny_model, "--output_name", out)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tok.pad_token_id is not None
    assert tok.model_max_length == 77  # the adapter's own tokenizer
    assert json.load(open(out / "reward_stats.json")) == {"mean": 0.5, "std": 2.0}
    trained = load_file(os.path.join(adapters["reward"], "adapter_model.safetensors"))["base_model.model.score.weight"]
    assert torch.equal(merged.score.weight, trained)

    b = batch(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        untrained = base(**b).logits[:, 0]
        want = PeftModel.from_pretrained(base, adapters["reward"]).eval()(**b).logits[:, 0]
        got = merged(**b).logits[:, 0]
    assert (got - want).abs().max() < 1e-4
    assert (got - untrained).abs().max() > 1e-2  # the head (and the LoRA) came along
    diff = json.loads(open(out / "metrics.jsonl").readline())["verify_max_abs_diff"]
    assert diff < 1e-4 and "SEQ_CLS" in open(out / "README.md").read()
    print(f"reward model merge: max abs diff {diff:.3g}")


def test_a_reward_adapter_without_its_score_head_is_refused(tiny_model, adapters, tmp_path):
    """StackLLaMA's early merges silently gave reward models a random head; here the missing head is an error."""
    import shutil

    from safetensors.torch import load_file, save_file

    headless = tmp_path / "headless"
    shutil.copytree(adapters["reward"], headless)
    weights = load_file(headless / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "score" not in k}, headless / "adapter_model.safetensors")
    with pytest.raises(UserError, match="without its trained `score` head") as e:
        merge("--adapter_model_name", headless, "--output_name", tmp_path / "rm")
    assert str(headless) in str(e.value) and leftovers(tmp_path / "rm") == []


def test_bfloat16_merge_passes_its_tolerance(adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    merge("--adapter_model_name", adapters["causal"], "--output_name", out, "--dtype", "bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    metrics = json.loads(open(out / "metrics.jsonl").readline())
    assert 0 < metrics["verify_max_abs_diff"] <= metrics["verify_tolerance"] < metrics["adapter_effect"]


def test_overwrite_needs_the_flag_and_replaces_the_old_model(adapters, tmp_path, hub_calls):
    out = tmp_path / "merged"
    merge("--adapter_model_name", adapters["causal"], "--output_name", out, "--verify", "false")
    assert hub_calls == []  # no --push_to_hub, no push
    (out / "stale.txt").write_text("from the old model")
    with pytest.raises(UserError, match="--overwrite") as e:
        merge("--adapter_model_name", adapters["causal"], "--output_name", out)
    assert str(out) in str(e.value) and (out / "stale.txt").exists()

    merge("--adapter_model_name", adapters["causal"], "--output_name", out, "--overwrite")
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(out) == ["merged"]
    assert "verify_max_abs_diff" in json.loads(open(out / "metrics.jsonl").readline())


def test_overwrite_never_deletes_a_folder_that_is_not_a_model_or_an_input(adapters, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no model"):
        merge("--adapter_model_name", adapters["causal"], "--output_name", notes, "--overwrite")
    assert (notes / "todo.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="would replace the input"):
        merge("--adapter_model_name", adapters["causal"], "--output_name", adapters["causal"], "--overwrite")
    assert os.path.isfile(os.path.join(adapters["causal"], "adapter_config.json"))


@pytest.mark.parametrize("case", ["missing", "plain model", "other base", "hub id offline", "missing base"])
def test_bad_adapter_or_base_is_a_clear_error_and_writes_nothing(case, tiny_model, adapters, other_base, tmp_path,
                                                                  capsys):
    out = tmp_path / "merged"
    missing, hub_id, no_base = str(tmp_path / "nope"), "nobody/no-such-adapter", str(tmp_path / "no-base")
    adapter, extra, needles = {  # each message names the folder at fault
        "missing": (missing, [], [missing, "no such folder"]),
        "plain model": (tiny_model, [], [tiny_model, "full model", "not a LoRA adapter"]),
        "other base": (adapters["causal"], ["--base_model_name", other_base],
                       [adapters["causal"], other_base, "size mismatch"]),
        "hub id offline": (hub_id, [], [hub_id, "no such folder, nor Hub repository"]),
        "missing base": (adapters["causal"], ["--base_model_name", no_base],
                         [f"--base_model_name {no_base}: no such folder"]),
    }[case]
    with pytest.raises(SystemExit) as e:
        run(lambda: main(*parse(["--adapter_model_name", adapter, "--output_name", str(out), *extra])))
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    for needle in needles:
        assert needle in errors[0]
    assert leftovers(out) == []


def test_a_failed_verification_writes_nothing(adapters, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.merge_and_unload

    def broken_merge(self, *args, **kwargs):  # a merge that gets one weight wrong
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0] += 1.0
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", broken_merge)
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="verification failed") as e:
        merge("--adapter_model_name", adapters["causal"], "--output_name", out)
    assert "nothing was written" in str(e.value)
    assert leftovers(out) == []
    # The check is what stopped it: skipped, the broken merge goes through.
    merge("--adapter_model_name", adapters["causal"], "--output_name", out, "--verify", "false")
    assert "not checked" in open(out / "README.md").read()


def test_one_process_only(adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="merge runs on one process; run it with python"):
        merge("--adapter_model_name", adapters["causal"], "--output_name", tmp_path / "a")
    assert leftovers(tmp_path / "a") == []


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """Records what would be pushed to the Hub, instead of pushing."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo, **kwargs):
            calls.append(("create", repo))

        def upload_folder(self, repo_id, folder_path):
            calls.append(("upload", repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    # The fake stands in for a reachable Hub and a logged-in user (merge refuses --push_to_hub offline or without a
    # token before it merges; the tests run offline).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    return calls


def test_push_to_hub_only_when_asked(adapters, tmp_path, hub_calls):
    merge("--adapter_model_name", adapters["causal"], "--output_name", tmp_path / "b", "--verify", "false",
          "--push_to_hub")
    assert hub_calls == [("create", "b"), ("upload", "b", str(tmp_path / "b"))]


@pytest.mark.slow
def test_stackllama_command_runs_unchanged(tiny_model, adapters, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm-merged"
    proc = run_script("merge_with_lora.py", f"--adapter_model_name={adapters['reward']}",
                      f"--base_model_name={tiny_model}", f"--output_name={out}")
    assert proc.returncode == 0 and "verify: max" in proc.stdout
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1


@pytest.mark.slow
def test_a_user_error_is_one_line_without_traceback(tmp_path):
    missing = str(tmp_path / "no-adapter")
    proc = run_script("merge_with_lora.py", "--adapter_model_name", missing, "--output_name", tmp_path / "out",
                      check=False)
    assert proc.returncode == 2
    assert_user_error(proc, missing, "no such folder")
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


def leave_out_part_of_one_update(monkeypatch, layer: str, fraction: float) -> None:
    """Make merge_and_unload merge all but ``fraction`` of one LoRA layer's update (B scaled before merging)."""
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.merge_and_unload

    def merge_less(self, *args, **kwargs):
        with torch.no_grad():
            for lora_b in self.model.get_submodule(layer).lora_B.values():
                lora_b.weight.mul_(1 - fraction)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BaseTuner, "merge_and_unload", merge_less)


def test_the_layer_check_names_a_layer_whose_update_was_partly_left_out(adapters, tmp_path, monkeypatch):
    layer = "model.layers.1.self_attn.v_proj"
    leave_out_part_of_one_update(monkeypatch, layer, 0.01)  # 1% of one layer's update: the logits barely move
    out = tmp_path / "merged"
    with pytest.raises(UserError, match=f"merged layer {layer} does not compute base \\+ adapter") as e:
        merge("--adapter_model_name", adapters["causal"], "--output_name", out)
    assert "nothing was written" in str(e.value) and leftovers(out) == []


def test_a_model_that_amplifies_rounding_is_kept_when_every_layer_matches(adapters, tmp_path, monkeypatch, capsys):
    """The end-to-end default bound is exceeded (set to 0 here; massive activations can amplify rounding past it)
    but the layer check passes: kept, with a note. An explicit --tolerance stays strict (docs/merge.md)."""
    import merge_with_lora

    monkeypatch.setattr(merge_with_lora, "fixed_tolerance", lambda dtype, reference: 0.0)
    out = tmp_path / "kept"
    merge("--adapter_model_name", adapters["reward"], "--output_name", out)
    assert "this model amplifies float rounding; the merge is kept" in capsys.readouterr().out
    metrics = json.loads(open(out / "metrics.jsonl").readline())
    assert metrics["verify_max_abs_diff"] > 0 and 0 < metrics["verify_worst_layer_share"] < 0.2
    assert metrics["verify_layers_checked"] == 4 * 7 + 1  # every LoRA layer and the score head
    with pytest.raises(UserError, match="--tolerance 1e-09"):
        merge("--adapter_model_name", adapters["reward"], "--output_name", tmp_path / "strict", "--tolerance", "1e-9")
    assert leftovers(tmp_path / "strict") == []


@pytest.mark.parametrize("kind,dtype", [("causal", "float32"), ("reward", "float32"), ("causal", "bfloat16")])
def test_every_changed_layer_is_checked_and_sits_well_inside_its_bound(adapters, tmp_path, kind, dtype):
    out = tmp_path / "merged"
    merge("--adapter_model_name", adapters[kind], "--output_name", out, "--dtype", dtype)
    metrics = json.loads(open(out / "metrics.jsonl").readline())
    assert metrics["verify_layers_checked"] == 4 * 7 + (kind == "reward")
    assert 0 < metrics["verify_worst_layer_share"] < 0.2
