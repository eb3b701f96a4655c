"""Merge a LoRA adapter into its base model, check the merge, and save a plain `transformers` model.

    python merge_with_lora.py --adapter_model_name runs/sft --output_name runs/sft-merged
        # base from adapter_config.json
    python merge_with_lora.py --adapter_model_name=XXX --base_model_name=YYY --output_name=ZZZ  # StackLLaMA's command

    from merge_with_lora import run_merge  # from Python: the flags as keyword arguments
    merged = run_merge(adapter_model_name="runs/sft", output_name="runs/sft-merged")

A reward-model adapter (task type SEQ_CLS) merges into a one-label `AutoModelForSequenceClassification` with its
trained `score` head, a causal-LM adapter into `AutoModelForCausalLM`. The base is always loaded in full precision
(also for an adapter trained on a 4/8-bit base), in its own dtype unless `--dtype` says otherwise.

Verification (`--verify false` skips it), on a fixed probe batch, before anything is written:
  - layer by layer: every layer the merge changed (each LoRA layer, the saved `score` head) is run on the inputs it
    had in base + adapter and must give the same outputs within rounding: 8 sqrt(K) unit roundoffs of the sum of
    the |terms| of its K-term dot products (a probabilistic bound on float summation). It judges each layer alone,
    so a small part of one layer's update left out is caught even when the logits barely move;
  - end to end: the probe logits must match within `--tolerance`, by default max(1, largest |logit|) times 1e-4
    in float32, or 10 machine epsilons in 16-bit (7.8e-2 bfloat16, 9.8e-3 float16: merging rounds every weight to
    that dtype). A float32 model that amplifies rounding through the layers (massive activations) can exceed that
    default although every layer matches; then a note says so and the merge is kept. An explicit `--tolerance`,
    and 16-bit merges, are enforced.
Measurements of both checks on the demo models: docs/merge.md.
A failed check writes nothing. The output is written to a sibling temporary folder and renamed into place once
complete.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from functools import partial

import common.quiet  # noqa: F401  (first: silences known library messages)

import torch

from common.cli import StageResult, UserError, call_stage, parse_args, run
from common.flag_checks import hub_problem
from common.modeling import (
    ModelArguments,
    check_model_path,
    check_vocabulary,
    is_adapter_folder,
    load_model,
    load_tokenizer,
    looks_local,
    read_adapter_config,
    resolve_base,
)
from common.outputs import (
    MetricsWriter,
    check_writable,
    holds_final_model,
    replace_folder,
    write_model_card,
    write_run_args,
    writing,
)
from common.prompts import format_example

# The probe batch: fixed texts in the project's template, of different lengths so that padding is exercised.
PROBES = [
    ("How do I reverse a list in Python?", "Use `reversed(xs)` for an iterator, or `xs[::-1]` for a new list."),
    ("What does `git rebase -i` do?", "It replays your commits one by one and lets you edit, squash or drop each."),
    ("Why is my SQL query slow?",
     "Check the plan with EXPLAIN; a missing index on the joined column is the usual cause."),
    ("Is 0 a natural number?", "It depends on the convention."),
]


@dataclass
class MergeArguments:
    adapter_model_name: str = field(metadata={"help": "LoRA adapter folder (or Hub id) to merge."})
    output_name: str = field(metadata={"help": "Folder to write the merged model to."})
    base_model_name: str | None = field(
        default=None,
        metadata={"help": "Base model (default: the adapter's own, from adapter_config.json)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Dtype to merge and save in (auto: the base's own).",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    verify: bool = field(
        default=True,
        metadata={"help": "Check the merged model against base + adapter on a probe batch."},
    )
    tolerance: float | None = field(
        default=None,
        metadata={"help": "Largest allowed |logit difference| (default: by dtype, see the module docstring)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace a model already in --output_name (once the new one is complete)."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Also upload the merged model to the Hub."})
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub repository for --push_to_hub (default: the output folder's name)."},
    )
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
            raise UserError(f"--adapter_model_name {name}: no such folder, nor Hub repository "
                            f"({str(e).splitlines()[0]})") from e
    if is_adapter_folder(name):
        return name
    if os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"--adapter_model_name {name} holds a full model (config.json), not a LoRA adapter: "
                        "it is already merged, or was trained without LoRA")
    raise UserError(f"--adapter_model_name {name} holds no LoRA adapter (no adapter_config.json)")


def check_output(args: MergeArguments, inputs: list[str]) -> None:
    out = args.output_name
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_name {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            raise UserError(f"--output_name {out} is not empty; pass --overwrite to replace it, "
                            "or choose another folder")
        if not holds_final_model(out):  # never delete a folder that is not a model, whatever the flags say
            raise UserError(f"--output_name {out} holds no model (config.json); "
                            "--overwrite replaces only a model folder")
    for path in inputs:  # the output, or a folder above it, must not be an input
        if (os.path.exists(path)
                and os.path.join(os.path.realpath(path), "").startswith(os.path.join(os.path.realpath(out), ""))):
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


class LayerRecord:
    """Inputs and outputs of every layer the merge changes (LoRA layers, the saved `score` head), recorded on a forward
    pass of base + adapter: ``rows`` token rows per layer, spread over the batch. ``check`` later runs the merged
    layers on the same inputs, so a layer is judged alone, whatever the layers around it amplify."""

    def __init__(self, peft_model, rows: int = 16):
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save copies, trainable tokens

        self.rows, self.records = rows, {}
        self.hooks = [module.register_forward_hook(partial(self._record, name))
                      for name, module in peft_model.base_model.model.named_modules()
                      if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper))]

    def _record(self, name, module, inputs, output):
        if not inputs or not isinstance(output, torch.Tensor):
            return
        x, y = inputs[0].detach(), output.detach()
        x = x.reshape(-1, x.shape[-1]) if x.is_floating_point() else x.reshape(-1)  # token ids for an embedding
        y = y.reshape(x.shape[0], -1)
        keep = torch.linspace(0, x.shape[0] - 1, min(self.rows, x.shape[0]), device=x.device).long()
        x, y = x[keep].clone(), y[keep].clone()
        with torch.no_grad():
            self.records[name] = (x, y, y.float().abs() + magnitude(module, x))

    def stop(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def check(self, merged) -> tuple[float, str]:
        """(largest |merged - recorded| as a share of its rounding bound, that layer's name). A dot product of K terms
        computed in floating point is off by about sqrt(K) unit roundoffs of the sum of its |terms| (Higham and Mary's
        probabilistic bound); the bound is ``ROUNDINGS`` times that, for both computations (sum |w| |x|, the LoRA
        path's |B| |A| |x|, |bias|, |output|). A share above 1 is a layer that does not compute base + adapter.
        """
        worst, worst_name = 0.0, ""
        for name, (x, y, scale) in self.records.items():
            module = merged.get_submodule(name)
            with torch.no_grad():
                got = module(x).reshape(y.shape).float()
                terms = x.shape[-1] if x.is_floating_point() else 1
                unit = torch.finfo(y.dtype).eps / 2
                bound = ROUNDINGS * terms**0.5 * unit * (scale + got.abs() + magnitude(module, x))
            share = ((got - y.float()).abs() / (bound + torch.finfo(torch.float32).tiny)).max().item()
            if not share <= worst:  # NaN counts as worst
                worst, worst_name = share, name
        return worst, worst_name


def magnitude(module, x: torch.Tensor) -> torch.Tensor:
    """Sum of |terms| in ``module(x)`` for a linear layer, embedding or peft LoRA layer around one (else 0): the
    scale that float rounding errors in its output are relative to."""
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    if isinstance(base, torch.nn.Linear):
        total = torch.nn.functional.linear(x.float().abs(), weight.float().abs())
    elif isinstance(base, Conv1D):
        total = x.float().abs() @ weight.float().abs()
    elif isinstance(base, torch.nn.Embedding):
        total = weight.float().abs()[x]
    else:
        return torch.zeros(())
    if bias is not None:
        total = total + bias.float().abs()
    if isinstance(module, LoraLayer):
        for name in module.active_adapters:
            if name in module.lora_A:
                a, b = module.lora_A[name].weight.float().abs(), module.lora_B[name].weight.float().abs()
                total = total + abs(module.scaling[name]) * ((x.float().abs() @ a.T) @ b.T)
            elif name in module.lora_embedding_A:
                a, b = module.lora_embedding_A[name].float().abs(), module.lora_embedding_B[name].float().abs()
                total = total + abs(module.scaling[name]) * (a.T[x] @ b.T)
    return total


# The multiple of sqrt(K) unit roundoffs (of the sum of |terms|) a merged layer's output may move by: well above the
# rounding of a correct merge, far below a LoRA update left out (measurements: docs/merge.md, "Layer by layer").
ROUNDINGS = 8


SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def fixed_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """The default end-to-end bound (see the module docstring)."""
    rel = 10 * torch.finfo(dtype).eps if dtype in SIXTEEN_BIT else 1e-4
    return rel * max(1.0, reference.abs().max().item())


def verify(args: MergeArguments, merged, batch, reference: torch.Tensor, layers: LayerRecord, *, metrics: dict) -> None:
    """Raise UserError unless the merge computes base + adapter: layer by layer, and on the probe logits."""
    diff = (probe(merged, batch) - reference).abs().max().item()
    share, name = layers.check(merged)
    tolerance = args.tolerance if args.tolerance is not None else fixed_tolerance(merged.dtype, reference)
    metrics.update(verify_max_abs_diff=diff, verify_tolerance=tolerance, verify_layers_checked=len(layers.records),
                   verify_worst_layer_share=share)
    print(f"verify: max |merged - (base + adapter)| = {diff:.3g} over {reference.numel()} probe logits "
          f"(tolerance {tolerance:.3g}; the adapter itself moves them by up to {metrics['adapter_effect']:.3g}); "
          f"{len(layers.records)} merged layers, the worst at {share:.2g} of its rounding bound ({name})")
    nothing = f"nothing was written to {args.output_name}"
    if not share <= 1:  # also catches NaN
        raise UserError(f"verification failed: merged layer {name} does not compute base + adapter (off by {share:.3g} "
                        f"times its rounding bound; the probe logits by {diff:.3g}); {nothing}")
    if not diff <= tolerance:
        # In 32/64-bit the layer check sees any real error, so a larger logit difference is the model amplifying
        # rounding; in 16-bit its bound is too loose to say that, and the end-to-end bound decides.
        if args.tolerance is not None or merged.dtype in SIXTEEN_BIT or math.isnan(diff):
            hint = "; merge in float32 (--dtype float32) or set --tolerance" if args.tolerance is None else ""
            raise UserError(f"verification failed: the merged model's logits differ from base + adapter by {diff:.3g} "
                            f"({'--' if args.tolerance is not None else ''}tolerance {tolerance:.3g}){hint}; {nothing}")
        print(f"note: the probe logits moved by {diff:.3g} (above {tolerance:.3g}) although every merged layer matches "
              "base + adapter within rounding: this model amplifies float rounding; the merge is kept")
    if metrics["adapter_effect"] <= tolerance:
        print("warning: the adapter barely changes the probe logits, so the check cannot tell merged from unmerged")


def check_inputs(args: MergeArguments) -> tuple[str, str, str, str]:
    """The adapter folder, its base, the flag that named the base and the adapter's task, all checked before any
    model loads (and the output place writable)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("merge runs on one process; run it with python, not torchrun or accelerate launch")
    if args.push_to_hub and (problem := hub_problem("--push_to_hub")):
        raise UserError(problem)  # before the merge, not after it
    adapter = find_adapter(args.adapter_model_name)
    base = args.base_model_name or resolve_base(adapter)[0]
    flag = "--base_model_name" + ("" if args.base_model_name else f" (from {adapter}/adapter_config.json)")
    if not args.base_model_name and looks_local(base) and not os.path.exists(os.path.expanduser(base)):
        raise UserError(f"the base model of --adapter_model_name {adapter}, {base} (its adapter_config.json), is not "
                        "there: moved or deleted? Pass the base with --base_model_name PATH")
    check_model_path(base, flag)
    check_output(args, [adapter, base])
    check_writable(args.output_name, "--output_name")  # before any model loads
    task = read_adapter_config(adapter).get("task_type") or "CAUSAL_LM"
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise UserError(f"--adapter_model_name {adapter} is a {task} adapter; this script merges CAUSAL_LM and "
                        "SEQ_CLS adapters")
    return adapter, base, flag, task


def main(args: MergeArguments) -> StageResult:
    adapter, base, flag, task = check_inputs(args)
    has_tokenizer = os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter if has_tokenizer else base, args.trust_remote_code)
    # Never quantized: an adapter trained on a 4/8-bit base merges into the full-precision weights.
    torch.manual_seed(0)  # a head the base lacks starts the same every run (the adapter's trained head replaces it)
    model = load_model(ModelArguments(model_name_or_path=base, dtype=args.dtype), task, args.trust_remote_code,
                       tokenizer.pad_token_id, flag, name_or_path=base)
    if getattr(model, "is_quantized", False):
        raise UserError(f"{flag} {base} is a quantized checkpoint; merging needs the full-precision base")
    check_vocabulary(tokenizer, model, adapter if has_tokenizer else base, base, "--adapter_model_name (its tokenizer)",
                     model_flag="--base_model_name")
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

    metrics = {"adapter": args.adapter_model_name, "base_model": base, "task_type": task,
               "dtype": str(model.dtype).removeprefix("torch."),
               "verify_max_abs_diff": "not checked (--verify false)"}
    if args.verify:  # base + adapter outputs before merging: merge_and_unload changes the model in place
        batch = tokenizer([format_example(q, a) for q, a in PROBES], return_tensors="pt", padding=True)
        layers = LayerRecord(model)
        try:
            reference = probe(model, batch)
        finally:
            layers.stop()
        with model.disable_adapter():
            metrics["adapter_effect"] = (probe(model, batch) - reference).abs().max().item()
    merged = model.merge_and_unload()
    if args.verify:
        verify(args, merged, batch, reference, layers, metrics=metrics)

    out = save_merged(args, merged, tokenizer, adapter=adapter, base=base, task=task, metrics=metrics)
    if args.push_to_hub:
        from huggingface_hub import HfApi

        repo = args.hub_model_id or os.path.basename(out)
        HfApi().create_repo(repo, exist_ok=True)
        HfApi().upload_folder(repo_id=repo, folder_path=out)
        print(f"pushed to {repo}")
    return StageResult(out, metrics)


def save_merged(args: MergeArguments, merged, tokenizer, *, adapter: str, base: str, task: str, metrics: dict) -> str:
    """The merged model, its tokenizer, run_args.yaml, metrics and model card into --output_name, swapped in only
    once complete; returns the folder."""
    out = os.path.normpath(args.output_name)
    tmp = f"{out}.tmp-{os.getpid()}"
    with writing(f"the merged model to {out}"):
        try:
            merged.save_pretrained(tmp)  # safetensors
            tokenizer.save_pretrained(tmp)
            if os.path.isfile(os.path.join(adapter, "reward_stats.json")):  # still true of the merged reward model
                shutil.copy2(os.path.join(adapter, "reward_stats.json"), tmp)
            write_run_args(tmp, args,
                           extra={"resolved": {"adapter_folder": adapter, "base_model": base, "task_type": task}})
            MetricsWriter(tmp).write({"step": 0, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
            cls = "AutoModelForSequenceClassification" if task == "SEQ_CLS" else "AutoModelForCausalLM"
            write_model_card(tmp, "merged " + ("reward model" if task == "SEQ_CLS" else "causal LM"), base,
                             f"none (a merge, checked on {len(PROBES)} fixed probe texts)", metrics,
                             notes=f"\nA plain model: `{cls}.from_pretrained(...)` loads it without peft.\n")
            replace_folder(tmp, out)  # with --overwrite (or an empty folder): swapped in once the new one is complete
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
    print(f"saved to {out}")
    return out


def parse(argv: list[str] | None = None, kwargs: dict | None = None) -> tuple[MergeArguments]:
    return parse_args((MergeArguments,), ALIASES, None, argv, __doc__, kwargs=kwargs)


def run_merge(**kwargs) -> StageResult:
    """The merge from Python: the keyword arguments are the flags without their dashes, with the same defaults and
    checks (StackLLaMA's names too)::

        from merge_with_lora import run_merge
        merged = run_merge(adapter_model_name="runs/sft", output_name="runs/sft_merged")
        merged.metrics["verify_max_abs_diff"]

    Returns the merged folder and the merge's metrics (the probe check's figures); a mistake raises
    ``common.cli.UserError``."""
    return call_stage("merge_with_lora.run_merge", parse, main, kwargs)


if __name__ == "__main__":
    run(lambda: main(*parse()))
