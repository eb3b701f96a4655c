"""Silence the library messages a user of these scripts cannot act on, each by name; every other warning stays.

Imported first by every script (``import common.quiet``, its own import section before the third-party ones, see
ruff.toml), because some of these messages are printed while a library is being imported. What is silenced, and
why it needs no action:

- bitsandbytes on a CPU with AVX512-bf16: "Failed to load CPU gemm_4bit_forward from kernels-community" when the
  optional ``kernels`` package is not installed; bitsandbytes then uses its own CPU kernel, the one our tests run.
- DeepSpeed's "Setting accelerator to CPU" on a machine without a GPU (printed when accelerate imports DeepSpeed).
- transformers 5's FutureWarning that ``is_gradient_checkpointing`` was renamed: read by TRL and peft, not by us.
  (Our own flag ``--gradient_checkpointing`` sets the new field, common/cli.py.)
- transformers' LOAD REPORT of a sequence-classification model loaded from a causal LM when the only differences
  are the expected ones: a new ``score`` head (MISSING) and the dropped ``lm_head`` (UNEXPECTED). Any other key,
  or a size mismatch, still prints the whole report.
- peft's "Unable to fetch remote file" when the adapter's base model is a local folder: peft asks the Hub about a
  path that is not a Hub id.
"""

from __future__ import annotations

import logging
import re
import warnings

_EXPECTED_HEAD_CHANGE = re.compile(r"^\s*(score\.\S+\s*\|\s*MISSING|lm_head\.\S+\s*\|\s*UNEXPECTED)\b")


def _not_gemm_fallback(record: logging.LogRecord) -> bool:
    return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


def _not_cpu_accelerator(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def _not_expected_reward_head(record: logging.LogRecord) -> bool:
    """False for a LOAD REPORT whose rows are only the new score head and the dropped LM head."""
    message = record.getMessage()
    if "ForSequenceClassification" not in message or "LOAD REPORT" not in message:
        return True
    rows = [line for line in message.splitlines()[1:] if "|" in line and not set(line) <= set("-|: ")]
    keys = [row for row in rows if re.search(r"\|\s*(MISSING|UNEXPECTED|MISMATCH|CONVERSION)", row)]
    return not keys or not all(_EXPECTED_HEAD_CHANGE.match(row) for row in keys)


def silence_known_noise() -> None:
    """Install the filters above (idempotent: a filter is added once per logger)."""
    for name, check in (("bitsandbytes.backends.cpu.ops", _not_gemm_fallback), ("DeepSpeed", _not_cpu_accelerator),
                        ("transformers.modeling_utils", _not_expected_reward_head)):
        logger = logging.getLogger(name)
        if check not in logger.filters:
            logger.addFilter(check)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # A local folder: absolute, ./ ../ ~ or with more than one slash (a Hub id is owner/name).
    warnings.filterwarnings("ignore", message=r"Unable to fetch remote file .* in ([/.~]|\S*/\S*/)")


silence_known_noise()
