"""Ctrl-C (SIGINT) and a cluster's SIGTERM on the command line: one line that says how far the stage got and how to
continue, exit status 130 or 143, never a traceback; with ``--save_on_interrupt`` the stage first finishes its step
and saves a checkpoint.

The command line's end (``common.cli.run``) installs the handlers; a stage reports where it is (``progress``) and,
with ``--save_on_interrupt``, asks ``requested()`` after each step whether to save and stop (every process stops at
the same step: the main process's answer is broadcast). A second signal stops at once. In a notebook (the Python
entries) nothing is installed: Ctrl-C there is the kernel's KeyboardInterrupt, as usual.
"""

from __future__ import annotations

import dataclasses
import os
import signal

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """A stage stopped by a signal (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, str(signum)))
        self.signum = signum


@dataclasses.dataclass
class Progress:
    """Where the running stage is, for the line printed when it is interrupted."""

    output_dir: str | None = None
    step: int = 0
    total: int | str | None = None
    save_on_interrupt: bool = False
    pending: int | None = None  # a signal received while --save_on_interrupt defers it to the end of the step


progress = Progress()


def save_on_interrupt_field():
    """The ``--save_on_interrupt`` flag, declared once for every training stage."""
    return dataclasses.field(default=False, metadata={
        "help": "On SIGINT or SIGTERM (a cluster's preemption), finish the current step and save a checkpoint before "
                "stopping (a second signal stops at once). Without it the stage stops at once; its last checkpoint "
                "is intact either way."})


def start(output_dir: str, total, save_on_interrupt: bool, step: int = 0) -> None:
    """A stage begins (or resumes at ``step``) in ``output_dir``: what the interrupt line will name."""
    progress.output_dir, progress.total, progress.step = output_dir, total, step
    progress.save_on_interrupt, progress.pending = save_on_interrupt, None


def _handler(signum, frame):
    if progress.save_on_interrupt and progress.pending is None:
        progress.pending = signum  # the stage saves at the end of this step, then stops
        return
    raise Interrupted(signum)


def install() -> None:
    """SIGINT and SIGTERM raise ``Interrupted`` (or, with ``--save_on_interrupt``, are deferred to the step's end)."""
    for signum in NAMES:
        signal.signal(signum, _handler)


def finished() -> None:
    """The stage's work is done and written: a signal while the process exits is ignored."""
    for signum in NAMES:
        signal.signal(signum, signal.SIG_IGN)


def requested(device=None) -> bool:
    """After a step, with ``--save_on_interrupt``: whether a signal came and the stage should save and stop. Under
    several processes the main process decides for all (``device``: where the collective's tensor lives)."""
    flag = progress.pending is not None
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([float(flag)], device=device or "cpu")
        torch.distributed.broadcast(t, src=0)
        flag = bool(t.item())
        if flag and progress.pending is None:
            progress.pending = signal.SIGTERM
    return flag


def stop() -> None:
    """Raise the deferred signal (the checkpoint is saved)."""
    raise Interrupted(progress.pending or signal.SIGINT)


def message(signum: int, command: str) -> str:
    """The one line an interrupted stage ends with."""
    from common.checkpoints import newest

    name = NAMES.get(signum, f"signal {signum}")
    if progress.output_dir is None:  # not training yet, or a stage without steps (merge, evaluate)
        return f"interrupted ({name}); nothing of this run was kept: the same command runs it again: {command}"
    from common.outputs import holds_final_model

    if holds_final_model(progress.output_dir):
        return f"interrupted ({name}) after the final model was saved in {progress.output_dir}: nothing to continue"
    at = f" at step {progress.step}" + (f" of {progress.total}" if progress.total is not None else "")
    last = newest(progress.output_dir)
    if last is None:
        return f"interrupted ({name}){at}; no checkpoint was saved yet: the same command starts again: {command}"
    again = command if "--resume_from_checkpoint" in command else f"{command} --resume_from_checkpoint latest"
    return f"interrupted ({name}){at}; newest checkpoint {last}; continue with: {again}"


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"
