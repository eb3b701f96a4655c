"""What every stage writes into its output folder (docs/design.md, "Output folder"): the resolved arguments, one
JSON line per log step, a model card, and the final model saved atomically.

The final save's commit point is the model's config file (``adapter_config.json`` or ``config.json``): weights
and tokenizer are written first under a temporary folder and moved in, the config last, so a folder that looks
like a model always is one.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import errno
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable

import yaml

from common.checkpoints import incomplete_message, missing_files, newest, step_of, write_origin
from common.errors import UserError

FINAL_MARKERS = ("adapter_config.json", "config.json")
METRICS_FILE = "metrics.jsonl"


def holds_final_model(output_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(output_dir, m)) for m in FINAL_MARKERS)


def prepare_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint=None) -> str | None:
    """Check ``--output_dir`` before anything is loaded, and resolve ``--resume_from_checkpoint`` in it.

    A regular file there is an error; so is a folder that already holds a final model, unless the run resumes
    or ``--overwrite_output_dir`` is given. A folder with checkpoints but no final model (a run stopped on the way)
    is resumed from its newest checkpoint when this is the command that wrote it (its ``run_args.yaml``), as
    Hugging Face's example scripts resume; any other command stops with one line naming the newest checkpoint and
    the two ways on. Returns the checkpoint to resume from, or None.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a folder: choose another path")
    resume = find_checkpoint(output_dir, resume_from_checkpoint)
    if holds_final_model(output_dir) and not overwrite and resume is None:
        raise UserError(f"--output_dir {output_dir} already holds a final model; pass --overwrite_output_dir to "
                        "replace it, or choose another folder")
    if resume is None and not overwrite and not holds_final_model(output_dir):
        last = newest(output_dir)
        if last is not None:
            if _recorded_command(output_dir) == command_line():
                return last  # the resume line says why (resume_reason)
            raise UserError(f"--output_dir {output_dir} holds checkpoints of a run that did not finish (newest: "
                            f"{last}, step {step_of(last)}) and another command wrote them: continue that run with "
                            "--resume_from_checkpoint latest, or start again with --overwrite_output_dir")
    check_writable(output_dir, "--output_dir")
    return resume


def resume_line(checkpoint: str, total, flag_given: bool, note: str | None = None) -> str:
    """The one line every resume prints: which checkpoint, which step of how many, and why."""
    why = "" if flag_given else ("; the same command as its run_args.yaml, so the run continues "
                                 "(--overwrite_output_dir starts again)")
    return f"resuming from {checkpoint} (step {step_of(checkpoint)} of {total}){why}" + (f"; {note}" if note else "")


def _recorded_command(output_dir: str) -> str | None:
    try:
        with open(os.path.join(output_dir, "run_args.yaml"), encoding="utf-8") as f:
            return (yaml.safe_load(f) or {}).get("command")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def clear_checkpoints(output_dir: str) -> int:
    """Remove the ``checkpoint-N`` folders of an earlier run (``--overwrite_output_dir``), so that a later
    ``--resume_from_checkpoint latest`` can only find this run's. Returns how many were removed."""
    removed = 0
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if re.fullmatch(r"checkpoint-\d+(\.old|\.tmp)?", name):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                removed += 1
    return removed


WRITE_ERRORS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
                errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.ENOENT: "the folder cannot be created there", errno.EEXIST: "it is a file, not a folder"}


def write_error(e: OSError) -> str:
    """Why a write failed, in words (the errno's meaning for the usual causes)."""
    return WRITE_ERRORS.get(e.errno, e.strerror or type(e).__name__)


def check_writable(folder: str, flag: str) -> None:
    """Create ``folder`` and write and remove a small file in it, so that a place the stage cannot write (a
    read-only file system, a path under a regular file, no permission, a full disk) is one error line before any
    model or data set loads, not a traceback after the training."""
    if os.environ.get("RANK", "0") != "0":  # one process checks (the others would race its clean-up)
        return
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    created = []  # the folders made for the probe, removed again: a stage that fails later has written nothing
    path = os.path.abspath(folder)
    while path and not os.path.lexists(path) and path != os.path.dirname(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({write_error(e)})") from e
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(made)


@contextlib.contextmanager
def writing(what: str):
    """Turn a failed write (disk full, file system gone read-only) into one error line naming ``what`` was being
    written; what was written before (earlier checkpoints, the last final model) is left as it was."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise UserError(f"could not write {what} ({write_error(e)}); what was there before is intact") from e


# The Python call running a stage now (``training_sft.run_sft(max_steps=3, ...)``); None on the command line.
_INVOCATION: contextvars.ContextVar[str | None] = contextvars.ContextVar("invocation", default=None)


@contextlib.contextmanager
def invoked_as(call: str):
    """While a stage's Python entry runs (``common.cli.call_stage``): ``call`` is the command it records."""
    token = _INVOCATION.set(call)
    try:
        yield
    finally:
        _INVOCATION.reset(token)


def command_line() -> str:
    """The command that runs this stage: the Python call of an entry such as ``run_sft``, else ``sys.argv``."""
    return _INVOCATION.get() or " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)


def _plain(value):
    """A YAML/JSON-safe copy of an argument value (enums, dtypes and other objects become strings)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(getattr(value, "value", value))


def write_run_args(output_dir: str, *arg_objects, extra: dict | None = None) -> str:
    """``run_args.yaml``: every resolved argument, grouped by dataclass, plus the command line."""
    record = {"command": command_line()}
    for obj in arg_objects:
        record[type(obj).__name__] = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                      if not f.name.startswith("_")}
    if extra:
        record.update(_plain(extra))
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "run_args.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(record, f, sort_keys=False, width=120)
    return path


class MetricsWriter:
    """Appends one JSON object per log step to ``metrics.jsonl``; a second log of the same step (the eval after
    the train log, the end-of-training summary) is merged into that step's line.

    On resume, lines past the checkpoint's step are dropped first, so the file continues without duplicate or
    missing steps.
    """

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.enabled = enabled
        self._last: dict | None = None
        self._last_offset = 0

    def truncate_after(self, step: int) -> None:
        if not (self.enabled and os.path.isfile(self.path)):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def reset(self) -> None:
        if self.enabled and os.path.isfile(self.path):
            os.remove(self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as f:
            if self._last is not None and self._last.get("step") == clean.get("step"):
                f.truncate(self._last_offset)  # rewrite this step's line with both logs merged
                clean = {**self._last, **clean}
            f.seek(0, os.SEEK_END)
            self._last_offset = f.tell()
            f.write(json.dumps(clean) + "\n")
        self._last = clean


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def final_tmp_dir(output_dir: str, clear: bool = False) -> str:
    """The temporary folder the final model is written to before ``commit_final`` moves it into place.

    Its name is the same on every process, so a distributed save (every rank takes part, the main one writes)
    lands in one place. ``clear`` removes a leftover of a crashed earlier run (main process, before training).
    """
    tmp = os.path.join(output_dir, ".final-tmp")
    if clear and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    return tmp


def commit_final(tmp: str, output_dir: str) -> None:
    """Move the files of ``tmp`` into ``output_dir``, the model's config file last (main process only)."""
    for marker in FINAL_MARKERS:  # an older final model stops looking complete before its files are replaced
        if os.path.isfile(os.path.join(output_dir, marker)):
            os.remove(os.path.join(output_dir, marker))
    umask = os.umask(0)
    os.umask(umask)
    for name in sorted(os.listdir(tmp), key=lambda n: n in FINAL_MARKERS):
        dst = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(tmp, name)):  # safetensors writes 0600 whatever the umask; share like any file
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)
    os.rmdir(tmp)


def atomic_save(output_dir: str, save: Callable[[str], None]) -> None:
    """Single-process form: ``save(tmp)`` then ``commit_final``."""
    tmp = final_tmp_dir(output_dir, clear=True)
    os.makedirs(tmp)
    save(tmp)
    commit_final(tmp, output_dir)


def write_model_card(output_dir: str, stage: str, base_model: str, dataset: str, metrics: dict, *, notes: str = "",
                     logs_metrics: bool = True) -> str:
    """A short ``README.md``: what this folder is, how it was made, and its key numbers. ``logs_metrics``: the
    folder has a ``metrics.jsonl`` to point to (an evaluation folder has none)."""
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    where = f"; the metrics of every log step in `{METRICS_FILE}`" if logs_metrics else ""
    text = f"""---
library_name: transformers
tags: [rlhf, {re.sub(r'[^a-z0-9-]', '-', stage.lower())}]
base_model: {base_model}
---

# {stage}

- Base model: `{base_model}`
- Data: `{dataset}`
- Written: {time.strftime('%Y-%m-%d %H:%M:%S')}

## Key metrics

| metric | value |
| --- | --- |
{rows}

## Command

```
{command_line()}
```

Every resolved argument is in `run_args.yaml`{where}.
{notes}
"""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class AtomicCheckpoints:
    """A ``Trainer`` mixin (``class T(AtomicCheckpoints, SFTTrainer)``): every checkpoint is written whole under
    ``checkpoint-N.tmp/`` and renamed to ``checkpoint-N`` once every process has written its part, so a crash
    mid-save leaves only a ``.tmp`` folder, which ``find_checkpoint`` never picks and the next save replaces.

    The Trainer builds the path ``<run dir>/checkpoint-N`` itself; pointing its run dir at the ``.tmp`` folder for
    the save puts the checkpoint at ``checkpoint-N.tmp/checkpoint-N``, which is then moved up. Old checkpoints
    are rotated (``--save_total_limit``) only after the new one is in place.
    """

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        staging, final = os.path.join(run_dir, name + ".tmp"), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # a crashed save of the same step
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging  # this save only
        try:
            with writing(f"checkpoint {final}"):
                super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG state, shards)
        if self.args.should_save:
            write_origin(os.path.join(staging, name), getattr(self, "checkpoint_origin", None) or {})  # last
            if self.state.best_model_checkpoint == os.path.join(staging, name):
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
            replace_folder(os.path.join(staging, name), final)  # the same step again, after an earlier resume
            shutil.rmtree(staging)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


def find_checkpoint(output_dir: str, value: str | bool | None) -> str | None:
    """Resolve ``--resume_from_checkpoint``: a path, or ``latest``/``true`` for the newest complete checkpoint.

    Only complete ``checkpoint-N`` folders count (``common.checkpoints``: every file its ``origin.json`` lists is
    there), never ``checkpoint-N.tmp`` (a save in progress or cut short). ``checkpoint-N.old`` counts when
    ``checkpoint-N`` is missing: a save that replaced it was cut short between its two renames (``replace_folder``).
    A path that is incomplete is one error line naming what it lacks and the newest complete checkpoint.
    """
    if value in (None, "", False) or str(value).lower() in ("false", "none", "no"):
        return None
    if str(value).lower() not in ("latest", "true", "last", "yes"):
        if not os.path.isdir(str(value)):
            raise UserError(f"--resume_from_checkpoint {value}: no such folder")
        if str(value).rstrip("/").endswith(".tmp") or missing_files(str(value)):
            raise UserError(incomplete_message(str(value)))
        return str(value)
    found = newest(output_dir)
    if found is None:
        raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {output_dir}")
    return found


def replace_folder(src: str, dst: str) -> None:
    """Move the folder ``src`` to ``dst``, replacing any ``dst``, such that ``dst`` is never missing or partial.

    On Linux the two are swapped atomically (``renameat2(RENAME_EXCHANGE)``) and the old one, now at ``src``, is
    removed. Where that is not available, ``dst`` is first renamed to ``dst.old`` (which ``find_checkpoint``
    accepts while ``dst`` is missing), then ``src`` to ``dst``, then ``dst.old`` is removed.
    """
    if not os.path.lexists(dst):
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src)
        return
    old = dst + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def checkpoint_processes(checkpoint: str) -> int | None:
    """How many processes wrote a checkpoint, from its per-process RNG files (the Trainer's ``rng_state.pth`` or
    ``rng_state_{rank}.pth``; accelerate's ``random_states_{rank}.pkl``); None if it holds none."""
    names = os.listdir(checkpoint)
    ranks = [n for n in names if re.fullmatch(r"(rng_state_\d+\.pth|random_states_\d+\.pkl)", n)]
    if ranks:
        return len(ranks)
    return 1 if "rng_state.pth" in names else None


def check_processes(checkpoint: str, num_processes: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes: the global batch, the data order and
    the per-process RNG states depend on it, so the run would not continue as it would have."""
    saved = checkpoint_processes(checkpoint)
    if saved is not None and saved != num_processes:
        raise UserError(f"{checkpoint} was written by a run with {saved} processes and this run has {num_processes}: "
                        f"resume it with {saved} processes")


def checkpoint_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])


def metrics_callback(writer: MetricsWriter):
    """A ``TrainerCallback`` that writes each log of the main process to ``writer`` (``step`` first)."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, "epoch": state.epoch}
                record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str)) or v is None})
                writer.write(record)

    return MetricsCallback()


def nonfinite_guard(max_consecutive: int = 3):
    """A ``TrainerCallback`` that keeps non-finite gradients out of the weights.

    Before each optimizer step it checks the gradients (already all-reduced under DDP, so every process agrees);
    if any is NaN or infinite it drops them all (``grad = None``: the optimizer leaves those weights and their
    moments alone), counts the step as skipped, and adds ``skipped_steps`` to the logs. After
    ``max_consecutive`` skipped steps in a row it stops training; ``guard.stopped`` then tells the script to
    stop with a message instead of saving a final model (the last checkpoint stays as it was).
    """
    import torch
    from transformers import TrainerCallback

    class NonFiniteGuard(TrainerCallback):
        def __init__(self):
            self.skipped, self.consecutive, self.stopped = 0, 0, False

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = all(torch.isfinite(g).all() for g in grads)
            if finite:
                self.consecutive = 0
                return
            for p in model.parameters():
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= max_consecutive:
                self.stopped = True
                control.should_training_stop = True
                control.should_save = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and any(k in logs for k in ("loss", "train_loss")):
                logs["skipped_steps"] = self.skipped

    return NonFiniteGuard()
