"""Merge a LoRA adapter into its base model, check the merge, and save a plain `transformers` model.

    python merge_with_lora.py --adapter_model_name runs/sft --output_name runs/sft-merged  # base from adapter_config.json
    python merge_with_lora.py --adapter_model_name=XXX --base_model_name=YYY --output_name=ZZZ  # StackLLaMA's command

A reward-model adapter (task type SEQ_CLS) merges into a one-label `AutoModelForSequenceClassification` with its
trained `score` head, a causal-LM adapter into `AutoModelForCausalLM`. The base is always loaded in full precision
(also for an adapter trained on a 4/8-bit base), in its own dtype unless `--dtype` says otherwise.

Verification (`--verify false` skips it): before merging, base + adapter scores a fixed probe batch; the merged
model must match it within `--tolerance`, by default max(1, largest |logit|) times 1e-4 in float32, or 10 machine
epsilons in 16-bit (7.8e-2 bfloat16, 9.8e-3 float16: merging rounds every weight to that dtype; on a 16-layer test
model we measured 2% and 0.25% of the logit scale). A failed check writes nothing. The output is written to a
sibling temporary folder and renamed into place once complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import torch

from common.cli import UserError, parse_args, run
from common.modeling import ModelArguments, check_model_path, is_adapter_folder, load_model, load_tokenizer, read_adapter_config, resolve_base
from common.outputs import MetricsWriter, holds_final_model, write_model_card, write_run_args
from common.prompts import format_example

# The probe batch: fixed texts in the project's template, of different lengths so that padding is exercised.
PROBES = [
    ("How do I reverse a list in Python?", "Use `reversed(xs)` for an iterator, or `xs[::-1]` for a new list."),
    ("What does `git rebase -i` do?", "It replays your commits one by one and lets you edit, squash or drop each."),
    ("Why is my SQL query slow?", "Check the plan with EXPLAIN; a missing index on the joined column is the usual cause."),
    ("Is 0 a natural number?", "It depends on the convention."),
]


@dataclass
class MergeArguments:
    adapter_model_name: str = field(metadata={"help": "LoRA adapter folder (or Hub id) to merge."})
    output_name: str = field(metadata={"help": "Folder to write the merged model to."})
    base_model_name: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own, from adapter_config.json)."})
    dtype: str = field(default="auto", metadata={"help": "Dtype to merge and save in (auto: the base's own).", "choices": ["auto", "bfloat16", "float16", "float32"]})
    verify: bool = field(default=True, metadata={"help": "Check the merged model against base + adapter on a probe batch."})
    tolerance: float | None = field(default=None, metadata={"help": "Largest allowed |logit difference| (default: by dtype, see above)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a model already in --output_name (once the new one is complete)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Also upload the merged model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub (default: the output folder's name)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code from the Hub to run."})


ALIASES = {"--adapter_name_or_path": "adapter_model_name", "--base_model_name_or_path": "base_model_name",
           "--output_dir": "output_name", "--overwrite_output_dir": "overwrite"}


def find_adapter(name: str) -> str:
    """The adapter's local folder (a Hub id is downloaded); a folder with no adapter in it is a clear error."""
    if not os.path.exists(name):
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise UserError(f"--adapter_model_name {name}: no such folder")
        from huggingface_hub import snapshot_download

        try:
            name = snapshot_download(name)
        except (OSError, ValueError) as e:
            raise UserError(f"--adapter_model_name {name}: no such folder, nor Hub repository ({str(e).splitlines()[0]})") from e
    if is_adapter_folder(name):
        return name
    if os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"--adapter_model_name {name} holds a full model (config.json), not a LoRA adapter: it is already merged, or was trained without LoRA")
    raise UserError(f"--adapter_model_name {name} holds no LoRA adapter (no adapter_config.json)")


def check_output(args: MergeArguments, inputs: list[str]) -> None:
    out = args.output_name
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_name {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            raise UserError(f"--output_name {out} is not empty; pass --overwrite to replace it, or choose another folder")
        if not holds_final_model(out):  # never delete a folder that is not a model, whatever the flags say
            raise UserError(f"--output_name {out} holds no model (config.json); --overwrite replaces only a model folder")
    for path in inputs:  # the output, or a folder above it, must not be an input
        if os.path.exists(path) and os.path.join(os.path.realpath(path), "").startswith(os.path.join(os.path.realpath(out), "")):
            raise UserError(f"--output_name {out} would replace the input {path}: choose another folder")


def saves_head(adapter: str) -> bool:
    """Whether the adapter holds a classification head (peft saves it as `...score.weight` or `...classifier...`)."""
    path = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return True  # a pickled adapter: not opened just to look; the merge check still runs
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return any(part in ("score", "classifier") for key in f.keys() for part in key.split("."))


def probe(model, batch) -> torch.Tensor:
    """float32 logits of the probe batch: every real (non-pad) position of a causal LM, or one score per text."""
    with torch.no_grad():
        logits = model(**batch).logits.float()
    return logits[batch["attention_mask"].bool()] if logits.dim() == 3 else logits


def main(args: MergeArguments) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("merge runs on one process; run it with python, not torchrun or accelerate launch")
    adapter = find_adapter(args.adapter_model_name)
    base = args.base_model_name or resolve_base(adapter)[0]
    flag = "--base_model_name" + ("" if args.base_model_name else f" (from {adapter}/adapter_config.json)")
    check_model_path(base, flag)
    check_output(args, [adapter, base])
    task = read_adapter_config(adapter).get("task_type") or "CAUSAL_LM"
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UserError(f"--adapter_model_name {adapter} is a {task} adapter; this script merges CAUSAL_LM and SEQ_CLS adapters")

    has_tokenizer = os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter if has_tokenizer else base, args.trust_remote_code)
    # Never quantized: an adapter trained on a 4/8-bit base merges into the full-precision weights.
    model = load_model(ModelArguments(model_name_or_path=base, dtype=args.dtype), task, args.trust_remote_code,
                       tokenizer.pad_token_id, flag, name_or_path=base)
    if getattr(model, "is_quantized", False):
        raise UserError(f"{flag} {base} is a quantized checkpoint; merging needs the full-precision base")
    base_is_classifier = any(a.endswith("ForSequenceClassification") for a in model.config.architectures or [])
    if task == "SEQ_CLS" and not base_is_classifier and not saves_head(adapter):  # StackLLaMA's lost `score` head
        raise UserError(f"--adapter_model_name {adapter} is a reward-model adapter without its trained `score` head "
                        "(modules_to_save): merged, it would score with a random head")
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError) as e:  # a size mismatch, or target modules the base lacks
        why = next((line.strip() for line in str(e).splitlines() if "mismatch" in line), str(e).splitlines()[0])
        raise UserError(f"--adapter_model_name {adapter} does not fit the base {base}: {why}") from e

    metrics = {"adapter": args.adapter_model_name, "base_model": base, "task_type": task, "dtype": str(model.dtype).removeprefix("torch."),
               "verify_max_abs_diff": "not checked (--verify false)"}
    if args.verify:  # base + adapter outputs before merging: merge_and_unload changes the model in place
        batch = tokenizer([format_example(q, a) for q, a in PROBES], return_tensors="pt", padding=True)
        reference = probe(model, batch)
        with model.disable_adapter():
            metrics["adapter_effect"] = (probe(model, batch) - reference).abs().max().item()
    merged = model.merge_and_unload()
    if args.verify:
        rel = 10 * torch.finfo(merged.dtype).eps if merged.dtype in (torch.bfloat16, torch.float16) else 1e-4
        tolerance = args.tolerance if args.tolerance is not None else rel * max(1.0, reference.abs().max().item())
        diff = (probe(merged, batch) - reference).abs().max().item()
        metrics.update(verify_max_abs_diff=diff, verify_tolerance=tolerance)
        print(f"verify: max |merged - (base + adapter)| = {diff:.3g} over {reference.numel()} probe logits "
              f"(tolerance {tolerance:.3g}; the adapter itself moves them by up to {metrics['adapter_effect']:.3g})")
        if not diff <= tolerance:  # also catches NaN
            raise UserError(f"verification failed: the merged model's logits differ from base + adapter by {diff:.3g} "
                            f"(tolerance {tolerance:.3g}); nothing was written to {args.output_name}")
        if metrics["adapter_effect"] <= tolerance:
            print("warning: the adapter barely changes the probe logits, so the check cannot tell merged from unmerged")

    out = os.path.normpath(args.output_name)
    tmp, old = f"{out}.tmp-{os.getpid()}", f"{out}.old-{os.getpid()}"
    replacing = os.path.exists(out)  # with --overwrite (or an empty folder): swapped out once the new one is complete
    try:
        merged.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        if os.path.isfile(os.path.join(adapter, "reward_stats.json")):  # still true of the merged reward model
            shutil.copy2(os.path.join(adapter, "reward_stats.json"), tmp)
        write_run_args(tmp, args, extra={"resolved": {"adapter_folder": adapter, "base_model": base, "task_type": task}})
        MetricsWriter(tmp).write({"step": 0, **{k: v for k, v in metrics.items() if isinstance(v, float)}})
        cls = "AutoModelForSequenceClassification" if task == "SEQ_CLS" else "AutoModelForCausalLM"
        write_model_card(tmp, "merged " + ("reward model" if task == "SEQ_CLS" else "causal LM"), base,
                         f"none (a merge, checked on {len(PROBES)} fixed probe texts)", metrics,
                         f"\nA plain model: `{cls}.from_pretrained(...)` loads it without peft.\n")
        if replacing:
            os.rename(out, old)
        os.rename(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    if replacing:
        shutil.rmtree(old)
    print(f"saved to {out}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        repo = args.hub_model_id or os.path.basename(out)
        HfApi().create_repo(repo, exist_ok=True)
        HfApi().upload_folder(repo_id=repo, folder_path=out)
        print(f"pushed to {repo}")


def parse(argv: list[str] | None = None) -> tuple[MergeArguments]:
    return parse_args((MergeArguments,), ALIASES, None, argv, __doc__)


if __name__ == "__main__":
    run(lambda: main(*parse()))
