"""Tokenizer and model loading shared by every stage.

A model argument may be a Hub id, a full model folder, or a LoRA adapter folder. An adapter folder (it has
``adapter_config.json``) is loaded on top of its base (``base_model_name_or_path`` from that file, or the
override the user gives) and merged in memory, so ``merge_with_lora.py`` is optional between stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from trl import ModelConfig

from common.cli import UserError
from common.flag_checks import attention_problem


@dataclass
class ModelArguments(ModelConfig):
    """TRL's ``ModelConfig`` with this project's defaults: LoRA on, dtype chosen by device, and the base of an
    adapter folder overridable."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id, model folder, or LoRA adapter folder (its base is read from adapter_config.json)."},
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Base model for an adapter given as --model_name_or_path (default: the adapter's own)."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use (default: the model's, or the adapter folder's if it has one)."},
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights dtype. Default: float32 on CPU, bfloat16 on GPUs that support it, else float32.",
            "choices": ["auto", "bfloat16", "float16", "float32", None],
        },
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (false: full fine-tuning)."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules LoRA adapts (default: every linear layer but the output head)."},
    )
    lora_task_type: str | None = field(
        default=None,
        metadata={"help": "LoRA task type; each script sets its own (CAUSAL_LM; SEQ_CLS for the reward model), so "
                          "another value is refused."},
    )

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise UserError("--load_in_4bit and --load_in_8bit exclude each other: pick one")
        if problem := attention_problem(self.attn_implementation):
            raise UserError(problem)
        super().__post_init__()


def trainer_device_defaults() -> dict:
    """Defaults for a TRL trainer config that fit the device.

    bf16 autocast and gradient checkpointing pay off on GPUs and cost several times the step time on a CPU.
    ``use_cpu`` on a machine without a GPU also lets ``torchrun`` form a gloo process group (accelerate only
    does that when told the run is on CPU).
    """
    on_gpu = torch.cuda.is_available()
    return {
        "bf16": None if on_gpu and torch.cuda.is_bf16_supported() else False,  # None: TRL's "bf16 unless fp16"
        "activation_checkpointing": on_gpu,  # transformers 5's name of gradient checkpointing
        "dataloader_pin_memory": on_gpu,
        "use_cpu": not on_gpu,
    }


def set_chat_template(tokenizer, path: str | None, flag: str = "--chat_template_path") -> None:
    """A ``.jinja`` chat template as the tokenizer's, before the data is tokenized (TRL's trainers set it only when
    they are built, after the scripts have rendered every conversation). TRL's other form, a tokenizer whose template
    is copied with its special tokens, would change the vocabulary after tokenizing: refused."""
    if not path:
        return
    if not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
        raise UserError(f"{flag} {path}: give a .jinja (or .j2) template file; copying another tokenizer's template "
                        "adds tokens after the data is tokenized, which these scripts do not support")
    with open(path, encoding="utf-8") as f:
        tokenizer.chat_template = f.read()


def set_eos_token(tokenizer, token: str | None, flag: str = "--eos_token") -> None:
    """Make ``token`` the tokenizer's EOS (before the data is tokenized: every example ends with it); it must be a
    token the tokenizer has, or its id would lie past the model's embeddings."""
    if not token:
        return
    if token not in tokenizer.get_vocab():
        raise UserError(f"{flag} {token!r} is not a token of the tokenizer (its EOS is {tokenizer.eos_token!r}): pass "
                        "one of its tokens")
    tokenizer.eos_token = token


def default_dtype() -> torch.dtype:
    """float32 on CPU (bf16 is several times slower there); bf16 on GPUs that support it; else float32."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, ""):
        return default_dtype()
    if name == "auto":
        return "auto"
    return getattr(torch, name)


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def read_adapter_config(path: str) -> dict:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        return json.load(f)


def resolve_base(name_or_path: str, base_override: str | None = None) -> tuple[str, str | None]:
    """(base model, adapter folder or None) for a model argument."""
    if is_adapter_folder(name_or_path):
        base = base_override or read_adapter_config(name_or_path).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{name_or_path}/adapter_config.json names no base model: pass --base_model_name_or_path")
        return base, name_or_path
    return name_or_path, None


def looks_local(name_or_path: str) -> bool:
    """Whether a model argument is meant as a local path rather than a Hub id (``org/name``): it starts with ``.``,
    ``/`` or ``~``, has more than one ``/``, or its parent folder exists here (``runs/sft`` with a ``runs/``)."""
    parent = os.path.dirname(name_or_path.rstrip("/"))
    return (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
            or bool(parent) and os.path.isdir(os.path.expanduser(parent)))


def check_model_path(name_or_path: str, flag: str, base_flag: str = "--base_model_name_or_path",
                     base_override: str | None = None) -> None:
    """A clear error for a local-looking path that does not exist (a Hub id is left to the Hub), at once: never a
    minute of Hub retries for a folder that is simply missing. An adapter folder's base is checked the same way
    (``base_flag`` names the flag that overrides it)."""
    if not name_or_path:
        raise UserError(f"{flag} is required")
    if looks_local(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise UserError(f"{flag} {name_or_path}: no such folder")
    if os.path.isdir(name_or_path) and not (
        is_adapter_folder(name_or_path) or os.path.isfile(os.path.join(name_or_path, "config.json"))
    ):
        raise UserError(f"{flag} {name_or_path}: folder holds neither a model (config.json) nor an adapter "
                        "(adapter_config.json)")
    if base_override:
        check_model_path(base_override, base_flag)
    elif is_adapter_folder(name_or_path):
        base = read_adapter_config(name_or_path).get("base_model_name_or_path")
        if base and looks_local(base) and not os.path.exists(os.path.expanduser(base)):
            raise UserError(f"{flag} {name_or_path} is an adapter whose base model {base} (its adapter_config.json) "
                            f"is not there: moved or deleted? Pass the base with {base_flag} PATH")


def quantization_config(args: ModelArguments, dtype: torch.dtype | str):
    """A ``BitsAndBytesConfig`` for ``--load_in_4bit``/``--load_in_8bit``, or None."""
    if args.load_in_4bit and args.load_in_8bit:
        raise UserError("--load_in_4bit and --load_in_8bit exclude each other: pick one")
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        bnb_4bit_quant_storage=args.bnb_4bit_quant_storage,
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str | None = None):
    """Tokenizer with a pad token always set (the EOS token if it had none).

    For an adapter folder, its own tokenizer files are used when it has them, else the base's.
    """
    from transformers import AutoTokenizer

    source = name_or_path
    if is_adapter_folder(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "tokenizer_config.json")):
        source = resolve_base(name_or_path)[0]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer from {source}: {str(e).splitlines()[0]}") from e
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of {source} has no EOS token; generation and packing need one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side:
        tokenizer.padding_side = padding_side
    return tokenizer


def check_vocabulary(tokenizer, model, tokenizer_source: str, model_source: str, tokenizer_flag: str,
                     *, model_flag: str) -> None:
    """Stop with one message when the tokenizer does not fit the model's embedding matrix.

    Too large: an id past the last embedding row (a bigger vocabulary, or a special token the tokenizer class adds
    after the base vocabulary, as Qwen2's does) would fail with an IndexError mid-run. Too small: a tokenizer of
    another model maps text to rows that mean something else; it trains on garbage and gets saved with the model.
    That is caught when the model folder has its own tokenizer of another size, or when the tokenizer covers less
    than 90% of the embedding rows (models pad their embeddings by at most a few hundred rows).
    """
    embeddings = model.get_input_embeddings()
    # num_embeddings, not weight.shape: under DeepSpeed ZeRO-3 the model is built partitioned and its weights are
    # empty placeholders on every process.
    rows = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    specials = [i for i in tokenizer.all_special_ids + [tokenizer.pad_token_id, tokenizer.eos_token_id]
                if i is not None]
    top = max([max(tokenizer.get_vocab().values(), default=0), *specials])
    size = len(tokenizer)
    if top >= rows:
        raise UserError(f"the tokenizer of {tokenizer_source} has {size} tokens (ids up to {top}) but the model "
                        f"{model_source} has {rows} embedding rows: ids from {rows} on would crash training; pass the "
                        f"model's own tokenizer ({tokenizer_flag}) or a model made for this tokenizer ({model_flag})")
    own = (_own_tokenizer_size(model_source)
           if os.path.normpath(tokenizer_source) != os.path.normpath(model_source) else None)
    if own is not None and own != size:
        raise UserError(f"the tokenizer of {tokenizer_source} has {size} tokens but the model {model_source} "
                        f"comes with a tokenizer of {own}: its ids would mean other tokens to this model; drop "
                        f"{tokenizer_flag} or pass a matching one")
    if size < 0.9 * rows:
        raise UserError(f"the tokenizer of {tokenizer_source} has {size} tokens but the model {model_source} has "
                        f"{rows} embedding rows: it is most likely another model's tokenizer; pass the model's own "
                        f"({tokenizer_flag}) or a model made for this tokenizer ({model_flag})")


def _own_tokenizer_size(model_source: str) -> int | None:
    """The size of the tokenizer that comes with a model folder (or adapter folder), if it has one."""
    folder = model_source
    if is_adapter_folder(folder) and not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        folder = resolve_base(folder)[0]
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        return None
    try:
        return len(load_tokenizer(folder))
    except UserError:
        return None


def _from_pretrained(cls, name_or_path: str, **kwargs):
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise UserError(f"could not load a model from {name_or_path}: {str(e).splitlines()[0]}") from e


def load_model(
    args: ModelArguments,
    task: str = "CAUSAL_LM",
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
    flag: str = "--model_name_or_path",
    *, name_or_path: str | None = None,
    require_score_head: bool = False,
):
    """Load a causal LM (``task="CAUSAL_LM"``) or a one-score sequence classifier (``"SEQ_CLS"``).

    An adapter folder is put on its base and merged, so the result is a plain ``transformers`` model ready for a
    new adapter. ``pad_token_id`` is written into the config (sequence classification scores the last non-pad
    token, so it must be right).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name_or_path = name_or_path or args.model_name_or_path
    if not name_or_path:
        raise UserError(f"{flag} is required")
    check_model_path(name_or_path, flag)
    base, adapter = resolve_base(name_or_path, args.base_model_name_or_path)
    if adapter and is_adapter_folder(base):
        # An adapter trained on another adapter folder (a reward model on an SFT adapter): load and merge that
        # one first, down to the root of the chain; the override applies to the first link only.
        model = load_model(dataclasses.replace(args, base_model_name_or_path=None), task, trust_remote_code,
                           pad_token_id, flag, name_or_path=base)
        return _merge_adapter(model, adapter, task, name_or_path, flag, require_score_head=require_score_head)
    dtype = resolve_dtype(args.dtype)
    kwargs = dict(
        dtype=dtype,
        revision=args.model_revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=args.attn_implementation,
        quantization_config=quantization_config(args, dtype),
    )
    if task == "SEQ_CLS":
        kwargs["num_labels"] = 1
        if adapter and read_adapter_config(adapter).get("task_type") not in (None, "SEQ_CLS", "CAUSAL_LM"):
            raise UserError(
                f"{flag} {adapter} is a {read_adapter_config(adapter).get('task_type')} adapter; a reward model "
                "loads a SEQ_CLS (reward model) or CAUSAL_LM (SFT) adapter"
            )
        model, info = _from_pretrained(AutoModelForSequenceClassification, base, output_loading_info=True, **kwargs)
        head_missing = any(k.split(".")[0] == "score" for k in info.get("missing_keys", []))
        if require_score_head and head_missing and not (adapter and _adapter_has(adapter, "score")):
            raise UserError(
                f"{flag} {name_or_path} has no trained `score` head (it is not a reward model): pass the output "
                "folder of training_reward_model.py, or a sequence-classification model with one label"
            )
    else:
        model = _from_pretrained(AutoModelForCausalLM, base, **kwargs)
    if args.load_in_4bit:
        _keep_4bit_layers_differentiable(model)
    if adapter:
        model = _merge_adapter(model, adapter, task, name_or_path, flag,
                               require_score_head=False)  # the score head was checked above
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = pad_token_id
    check_lora_parameters(model, args.lora_target_parameters)
    return model


def check_lora_parameters(model, names: list[str] | None) -> None:
    """``--lora_target_parameters``: each name must end the name of a parameter outside a linear layer (an MoE's
    stacked expert weights); peft refuses a linear layer's weight with a message that names no flag."""
    for target in names or []:
        owners = [module for prefix, module in model.named_modules()
                  for name, _ in module.named_parameters(recurse=False) if f"{prefix}.{name}".endswith(target)]
        if not owners:
            raise UserError(f"--lora_target_parameters {target} matches no parameter of the model")
        if any(isinstance(m, torch.nn.Linear) for m in owners):
            raise UserError(f"--lora_target_parameters {target} is a linear layer's weight: give its layer to "
                            "--lora_target_modules (--lora_target_parameters is for parameters outside linear "
                            "layers, such as an MoE's expert weights)")


def _merge_adapter(model, adapter: str, task: str, name_or_path: str, flag: str, *, require_score_head: bool):
    """``adapter`` merged into ``model`` in memory (into a 4/8-bit base too, with peft's rounding), so that a new
    adapter can go on top. An SFT (CAUSAL_LM) adapter merges into a classifier's backbone: peft's causal-LM wrapper
    expects a generate() the classifier lacks, and an `lm_head` it targets or saves has no counterpart there."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(adapter)
    if task == "SEQ_CLS" and config.task_type == "CAUSAL_LM":
        if require_score_head:
            raise UserError(f"{flag} {name_or_path}: {adapter} is an SFT (CAUSAL_LM) adapter, not a reward model")
        present = {n for full, _ in model.named_modules() for n in (full, full.rsplit(".", 1)[-1])}
        config.task_type = None
        config.modules_to_save = [m for m in config.modules_to_save or [] if m in present] or None
        if isinstance(config.target_modules, (list, set)):
            config.target_modules = {m for m in config.target_modules if m in present}
    elif require_score_head and task == "SEQ_CLS" and not _adapter_has(adapter, "score"):
        # A reward adapter on top of another adapter must bring its own head (its base, an adapter, has none).
        raise UserError(f"{flag} {name_or_path}: {adapter} has no trained `score` head (it is not a reward model)")
    model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    # A new adapter trained on top must record this adapter folder as its base (peft reads name_or_path),
    # or merging it later would silently drop this adapter's weights.
    model.name_or_path = model.config._name_or_path = name_or_path
    return model


def _keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes 0.50 on a CPU with avx512_bf16 repacks a 4-bit layer for inference the first time it runs in
    eval mode without grad, and from then on its matmul has no autograd: LoRA layers before it stop getting
    gradients (after the first evaluation, or after PPO's rollout). Opt out of the repacking."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _adapter_has(adapter: str, module: str) -> bool:
    """Whether the adapter's weights include ``module`` (e.g. a reward model's ``score`` head)."""
    from safetensors import safe_open

    path = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return False
    with safe_open(path, "pt") as f:
        return any(f".{module}." in f".{k}" for k in f.keys())


def lora_config(args: ModelArguments, task: str = "CAUSAL_LM"):
    """The LoRA config from flags; a reward model also trains and saves its ``score`` head."""
    if args.lora_task_type not in (None, task):
        raise UserError(f"--lora_task_type {args.lora_task_type}: this stage trains a {task} adapter (the task type "
                        "follows the stage); drop the flag")
    if not args.use_peft:
        return None
    from peft import LoraConfig

    modules_to_save = list(args.lora_modules_to_save or [])
    if task == "SEQ_CLS" and "score" not in modules_to_save:
        modules_to_save.append("score")
    target = args.lora_target_modules
    if isinstance(target, list) and len(target) == 1:
        target = target[0]
    return LoraConfig(
        task_type=task,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target,
        target_parameters=args.lora_target_parameters,
        modules_to_save=modules_to_save or None,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        bias="none",
    )


def plain_lm_head(model) -> bool:
    """Make `model(..., fused_lm_head=True)` compute what TRL's fused LM head returns, from plain full logits.

    `SFTTrainer` and `DPOTrainer` take their loss or log-probs, entropy, mean logit and token accuracy from
    `trl.trainer.utils.add_fused_lm_head`, which never holds the `[tokens, vocab]` logits. Without Triton (on CPU)
    it does so tile by tile in torch and recomputes every tile in the backward, which costs more than the logits it
    saves (benchmarks/README.md). This gives the same loss, log-probs, entropy, log(sum p^2) (DPO's weighting), mean
    logits and top-1 flags (tests/test_sft.py compares both heads, values and gradients).
    Calls it does not cover -- generation, pre-shifted labels, MoE router losses -- go to TRL's head; models with
    logit soft-capping or scaling are left alone.
    Returns whether the head was replaced.
    """
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    if (any(getattr(text_config, k, None) is not None for k in scaled)
            or getattr(text_config, "output_router_logits", False)):
        return False
    fused = model.forward  # TRL's, kept for every call not handled here

    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or labels is None or kwargs.get("shift_labels") is not None:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, num_items_in_batch=num_items_in_batch,
                         **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        logits = self.get_output_embeddings()(hidden).float()
        logp = logits.log_softmax(-1)
        log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
        with torch.no_grad():  # metrics only (log_sum_sq_probs: DPO's --use_weighting, WPO)
            entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0.0)
            log_sum_sq_probs = torch.logsumexp(2 * logp, -1).masked_fill(~mask, 0.0)
            mean_logits = logits.mean(-1).masked_fill(~mask, 0.0)
            is_top1 = (logits.argmax(-1) == labels) & mask
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask, log_sum_sq_probs=log_sum_sq_probs)

    model.forward = types.MethodType(forward, model)
    return True
