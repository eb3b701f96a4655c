"""Device plumbing of the PPO trainer: what changes with DDP, DeepSpeed ZeRO-2/3 and FSDP, kept apart from the
algorithm (common/ppo.py) so the trainer reads the same on one process and on many.
"""

from __future__ import annotations

import contextlib

from common.cli import UserError
from common.ppo_config import PPOConfig


def distributed_type(accelerator) -> str:
    return accelerator.distributed_type.name


def is_deepspeed(accelerator) -> bool:
    return distributed_type(accelerator) == "DEEPSPEED"


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def is_sharded(accelerator) -> bool:
    """DeepSpeed or FSDP: weights and optimizer state are split across processes."""
    return distributed_type(accelerator) in ("DEEPSPEED", "FSDP")


def check_supported(accelerator) -> None:
    """Refuse FSDP: the reference and value passes call the unwrapped model, whose parameters FSDP keeps sharded
    outside its own forward. Under FSDP1 they would run on flat shards; FSDP2 and gradient accumulation across its
    reshards are untested here. DeepSpeed ZeRO-3 shards the weights too and is supported."""
    if distributed_type(accelerator) == "FSDP":
        raise UserError("training_rl.py does not run under FSDP (its reference and value passes need the full "
                        "parameters outside FSDP's forward): use DeepSpeed ZeRO-3 "
                        "(configs/accelerate/deepspeed_zero3.yaml) to shard the policy, or DDP")


@contextlib.contextmanager
def unwrap_for_generation(model, accelerator):
    """The bare ``PolicyWithValueHead`` for ``generate``: gradient checkpointing off (it disables the KV cache)
    and, under DeepSpeed ZeRO-3, the sharded parameters gathered on every process for the duration."""
    unwrapped = accelerator.unwrap_model(model)
    policy = unwrapped.policy
    lm = unwrapped.lm()
    checkpointing = getattr(lm, "is_activation_checkpointing", False)
    if checkpointing:
        policy.gradient_checkpointing_disable()
    try:
        if is_zero3(accelerator):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                yield unwrapped
        else:
            yield unwrapped
    finally:
        if checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def whole_models_under_zero3(accelerator):
    """Models loaded inside are whole on every process, also under DeepSpeed ZeRO-3.

    Under ZeRO-3 accelerate registers its DeepSpeed config with transformers (whatever `zero3_init_flag` says),
    and `from_pretrained` then builds every model inside `deepspeed.zero.Init`: partitioned, with empty weights
    outside a DeepSpeed engine. The reward model and a full fine-tuning reference are used for inference only
    and never prepared, so they are loaded here with the registration lifted for the duration.
    """
    if not is_zero3(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def configure_deepspeed(config: dict, hp: PPOConfig) -> None:
    """Fill a DeepSpeed config's "auto" batch fields from the PPO flags, and refuse values that disagree.

    accelerate fills these from a prepared DataLoader, and PPO prepares none: without this, `prepare` fails
    asking for `train_micro_batch_size_per_gpu`. One engine micro-batch is one PPO minibatch; the engine steps
    after `gradient_accumulation_steps` of them and clips to `--max_grad_norm` itself.
    """
    wanted = {"train_micro_batch_size_per_gpu": (hp.mini_batch_size, "--mini_batch_size"),
              "gradient_accumulation_steps": (hp.gradient_accumulation_steps, "--gradient_accumulation_steps"),
              "gradient_clipping": (hp.max_grad_norm or 0.0, "--max_grad_norm")}
    for key, (value, flag) in wanted.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif float(config[key]) != float(value):
            raise UserError(f"the DeepSpeed config sets {key} {config[key]} but {flag} is {value}: make them agree "
                            f"(or set it to 'auto' in the DeepSpeed config)")
    if "train_batch_size" in config and config["train_batch_size"] == "auto":
        del config["train_batch_size"]  # DeepSpeed derives it from the two fields above and the world size


def loss_scale(accelerator, gradient_accumulation_steps: int) -> float:
    """What a micro-batch's loss (a token sum over the whole optimizer step's token count) is multiplied by so that
    the gradients the optimizer sees are exactly that loss's gradient.

    DDP and DeepSpeed average gradients over processes (x num_processes undoes it); DeepSpeed's engine also divides
    every micro-batch's loss by its gradient_accumulation_steps (x that undoes it). accelerate's own division by
    its gradient_accumulation_steps does not apply: it stays 1, the accumulation is ours.
    """
    scale = float(accelerator.num_processes)
    if is_deepspeed(accelerator):
        scale *= gradient_accumulation_steps
    return scale


@contextlib.contextmanager
def micro_batch(accelerator, model, last: bool):
    """One micro-batch of an optimizer step: under DDP the gradients are all-reduced on the ``last`` one only
    (``no_sync`` before it); DeepSpeed's engine accumulates until ``sync_gradients`` is true and then steps."""
    accelerator.sync_gradients = last
    try:
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            yield
    finally:
        accelerator.sync_gradients = True
