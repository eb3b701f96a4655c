"""Flag checks the libraries leave to the first step, or answer with a traceback or a message that names no flag:
trackers, optimizers and kernels whose package is not installed, a learning-rate schedule missing its arguments, the
Hub while offline, multi-process features in a single process, attention kernels this machine cannot train with.
Each returns problems naming the flag (the scripts' ``check_args`` raise them together, before anything loads);
scripts/audit_flags.py finds the flags that need one (docs/flags.md).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from common.errors import UserError


def attention_problem(name: str | None) -> str | None:
    """Why ``--attn_implementation name`` cannot train here, or None: a kernel package that is not installed (or
    needs a GPU), or FlexAttention on CPU, which has no backward pass there."""
    if name in (None, "", "eager", "sdpa"):
        return None
    from transformers.utils import import_utils

    if name == "flex_attention" and not torch.cuda.is_available():
        return ("--attn_implementation flex_attention has no backward pass on CPU (torch raises at the first step): "
                "use sdpa or eager")
    check = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available"}
    available = getattr(import_utils, check.get(name, ""), None)
    if available is not None and not available():
        return (f"--attn_implementation {name} needs the {name.replace('_attention_', '-attn ')} package and a CUDA "
                "GPU, not found here: use sdpa or eager")
    return None


# The package each --report_to tracker of transformers needs (pip names).
TRACKER_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "mlflow": "mlflow", "neptune": "neptune",
                    "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "codecarbon": "codecarbon",
                    "clearml": "clearml", "dagshub": "dagshub mlflow", "flyte": "flytekit", "dvclive": "dvclive",
                    "swanlab": "swanlab", "aim": "aim"}


def tracker_problems(report_to, known=None, available=None, flag: str = "--report_to") -> list[str]:
    """``report_to`` (a name, comma-separated names or a list) against the trackers ``known`` and those
    ``available`` here (default: transformers' integrations): an unknown name, or one whose package is not
    installed, is a problem naming the flag. ``none`` and ``all`` (whatever is installed) always pass."""
    if known is None or available is None:
        from transformers.integrations.integration_utils import (
            INTEGRATION_TO_CALLBACK,
            get_available_reporting_integrations,
        )

        known, available = list(INTEGRATION_TO_CALLBACK), get_available_reporting_integrations()
    names = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "none").split(",")
    names = [n.strip() for n in names if n.strip() not in ("", "none", "all") and n.strip() not in available]
    unknown = [n for n in names if n not in known]
    missing = [n for n in names if n in known and n != "kubeflow"]
    problems = []
    if unknown:
        problems.append(f"{flag} {', '.join(unknown)}: not a tracker; one of none, all, {', '.join(known)}")
    if missing:
        problems.append(f"{flag} {', '.join(missing)}: not installed (pip install "
                        f"{' '.join(TRACKER_PACKAGES.get(n, n) for n in missing)}); leave "
                        f"{'it' if len(missing) == 1 else 'them'} out, or --report_to none")
    if "kubeflow" in names:
        problems.append(f"{flag} kubeflow reports to a Kubeflow TrainJob (KUBEFLOW_TRAINER_SERVER_URL is not set "
                        "here): leave it out")
    return problems


def scheduler_problem(name: str, kwargs: dict | None, kwargs_flag: str | None = "--lr_scheduler_kwargs") -> str | None:
    """Why transformers' ``get_scheduler(name, ..., scheduler_specific_kwargs=kwargs)`` fails (an unknown name, an
    argument the schedule needs or does not take), tried on a throwaway optimizer; None when it builds."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10,
                      scheduler_specific_kwargs=dict(kwargs or {}))
    except (ValueError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        given = f" with {kwargs_flag} {json.dumps(kwargs)}" if kwargs else ""
        hint = f"; its arguments go in {kwargs_flag} as JSON" if kwargs_flag else ""
        return f"--lr_scheduler_type {name}{given}: {why}{hint}"
    return None


def hub_problem(flag: str = "--push_to_hub", token: str | None = None) -> str | None:
    """Why an upload to the Hub would fail before it starts (offline mode, no token), or None. The upload itself
    (a network error, a repository without write access) fails only when it runs."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return (f"{flag} cannot reach the Hub: HF_HUB_OFFLINE is set; unset it or drop {flag} (upload the saved "
                "folder later with `hf upload`)")
    if not (token or get_token()):
        return f"{flag} needs a Hugging Face token: log in with `hf auth login`" + \
            (", or pass --hub_token" if flag == "--push_to_hub" and token is None else "")
    return None


@contextlib.contextmanager
def trainer_validation():
    """A TRL trainer's own checks of its arguments against the model and data, made while it is built (a
    ``ValueError`` or ``NotImplementedError`` naming the field: ``router_aux_loss_coef`` on a model without experts),
    as a one-line ``UserError``."""
    try:
        yield
    except (ValueError, NotImplementedError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise UserError(" ".join(lines) if lines else type(e).__name__) from e


def accelerate_tracker_problems(trackers) -> list[str]:
    """training_rl.py's ``--report_to`` trackers (names, or tracker objects, which pass) against accelerate's:
    accelerate drops one whose package is missing with a debug line only, and fails on an unknown name."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [t for t in trackers or [] if isinstance(t, str)]
    available = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    return tracker_problems(names, list(LOGGER_TYPE_TO_CLASS), available)


def launched() -> bool:
    """Whether a distributed launcher (torchrun, accelerate launch, deepspeed) started this process."""
    return "LOCAL_RANK" in os.environ


def trainer_flag_problems(config, pairs: bool = False) -> list[str]:
    """Problems with a transformers ``TrainingArguments`` (SFT, reward model, DPO) that the libraries would only
    meet after the model is loaded, or meet with a traceback or an anonymous message: trackers, optimizers and
    kernels whose package is not installed, a schedule missing its arguments, the Hub while offline, multi-process
    features in a single process, and (``pairs``: a stage that trains on preference pairs) batching by length."""
    problems = tracker_problems(config.report_to)
    name = lambda value: str(getattr(value, "value", value))  # noqa: E731  (enums by their flag value)
    optim_args_ok = True
    if config.optim_args:
        try:
            from transformers.trainer_optimizer import _parse_optim_args

            _parse_optim_args(config.optim_args)
        except ImportError:
            pass
        except ValueError:
            optim_args_ok = False
            problems.append(f"--optim_args must be comma-separated key=value pairs (e.g. 'amsgrad=True,foreach=False'),"
                            f" got {config.optim_args!r}")
    if optim_args_ok:
        try:
            from transformers import Trainer

            Trainer.get_optimizer_cls_and_kwargs(config)  # imports the optimizer's package; no model needed mostly
        except (ImportError, ValueError, TypeError, NotImplementedError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "pass a model" not in why and "pass a `model`" not in why:  # checked when the model is built
                problems.append(f"--optim {name(config.optim)}: {why}")
    if problem := scheduler_problem(name(config.lr_scheduler_type), config.lr_scheduler_kwargs):
        problems.append(problem)
    if config.use_liger_kernel:
        from transformers.utils import is_liger_kernel_available

        if not is_liger_kernel_available():
            problems.append("--use_liger_kernel needs the liger-kernel package (pip install liger-kernel) and a GPU")
    if config.fp16 and config.device.type == "cpu":  # accelerate then trains in float32 without a word
        problems.append("--fp16 needs a GPU: on CPU accelerate has no float16 autocast and would train in float32; "
                        "use --bf16 for mixed precision on CPU")
    if getattr(config, "activation_offloading", False) and not torch.cuda.is_available():
        problems.append("--activation_offloading moves activations from the GPU to CPU memory: it needs a GPU")
    if name(config.save_strategy) == "best" and not config.metric_for_best_model:
        problems.append("--save_strategy best needs --metric_for_best_model (e.g. eval_loss) to compare checkpoints")
    if config.push_to_hub and (problem := hub_problem("--push_to_hub", config.hub_token)):
        problems.append(problem)
    if name(config.train_sampling_strategy) in ("group_by_length", "batch_rebalance") and pairs:
        problems.append(f"--train_sampling_strategy {name(config.train_sampling_strategy)} batches single sequences "
                        "by length; this stage trains on pairs: use random or sequential")
    for flag, value in (("--fsdp", config.fsdp), ("--deepspeed", config.deepspeed)):
        if value and not launched():
            problems.append(f"{flag} needs several processes started by a launcher (torchrun --nproc_per_node N, "
                            "accelerate launch or deepspeed); this is a plain python run")
    return problems
