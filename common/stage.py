"""The output-folder contract of a stage trained by a transformers ``Trainer`` (SFT and the reward model): checks
before anything is loaded, the callbacks that write ``metrics.jsonl`` and keep non-finite gradients out of the
weights, ``run_args.yaml``, resume, the atomic final save and the model card (docs/design.md, "Output folder").

    stage = TrainerStage(config, script.overwrite_output_dir)    # checks --output_dir and the checkpoint to resume
    trainer = build_trainer(..., callbacks=stage.callbacks)
    stage.begin(script, model_args, config)                        # run_args.yaml, metrics.jsonl started or continued
    stage.train(trainer)                                           # resumes, stops on repeated non-finite steps
    tmp = stage.save_model(trainer)                                # every process; the model into a temporary folder
    stage.commit(tmp, tokenizer, card)                             # main process: tokenizer, files moved in, card
"""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback

from common import interrupt
from common.checkpoints import check_origin, origin
from common.cli import UserError
from common.outputs import (
    MetricsWriter,
    check_processes,
    checkpoint_step,
    clear_checkpoints,
    commit_final,
    final_tmp_dir,
    metrics_callback,
    nonfinite_guard,
    prepare_output_dir,
    resume_line,
    write_model_card,
    write_run_args,
    writing,
)


class TrainerStage:
    def __init__(self, config, overwrite_output_dir: bool, save_on_interrupt: bool = False):
        self.config, self.output_dir = config, config.output_dir
        self.overwrite, self.save_on_interrupt = overwrite_output_dir, save_on_interrupt
        self.resume = prepare_output_dir(config.output_dir, overwrite_output_dir, config.resume_from_checkpoint)
        if self.resume:
            check_processes(self.resume, config.world_size)
        self.is_main = config.process_index == 0
        self.writer = MetricsWriter(config.output_dir, enabled=self.is_main)
        self.guard = nonfinite_guard()
        self.callbacks = [self.guard, metrics_callback(self.writer), InterruptCallback()]

    def begin(self, *arg_objects, trainer=None, tokenizer=None, stage: str = "") -> None:
        """Before training: every checkpoint of ``trainer`` will record the model it trains (``origin.json``), and a
        resume onto another model stops here, before any step; a resume says from where. Then (main process) drop
        a crashed final save's leftovers and an overwritten run's checkpoints, write ``run_args.yaml``, and start
        ``metrics.jsonl`` afresh or, on resume, cut it back to the checkpoint's step."""
        if trainer is not None:
            model_args = next(o for o in arg_objects if hasattr(o, "model_name_or_path"))
            trainer.checkpoint_origin = origin(model_args.model_name_or_path, trainer.model, tokenizer, stage)
            if self.resume:
                note = check_origin(self.resume, trainer.checkpoint_origin)
                if self.is_main:
                    total = self.config.max_steps if self.config.max_steps > 0 else \
                        f"{self.config.num_train_epochs:g} epochs"
                    print(resume_line(self.resume, total, bool(self.config.resume_from_checkpoint), note), flush=True)
        if not self.is_main:
            return
        if self.overwrite and not self.resume and (removed := clear_checkpoints(self.output_dir)):
            print(f"--overwrite_output_dir: removed {removed} checkpoint folder(s) of the earlier run in "
                  f"{self.output_dir}", flush=True)
        final_tmp_dir(self.output_dir, clear=True)
        write_run_args(self.output_dir, *arg_objects)
        if self.resume:
            self.writer.truncate_after(checkpoint_step(self.resume))
        else:
            self.writer.reset()

    def train(self, trainer) -> None:
        total = self.config.max_steps if self.config.max_steps > 0 else None
        interrupt.start(self.output_dir, total, self.save_on_interrupt,
                        checkpoint_step(self.resume) if self.resume else 0)
        if self.resume and total is not None and checkpoint_step(self.resume) >= total:
            # The run stopped after its last step's checkpoint, before the final save: Trainer.train would take one
            # step more before it checks max_steps. The weights are the checkpoint's; the final save follows.
            print(f"the checkpoint is the last step ({total}): no step left, saving it as the final model")
            trainer._load_from_checkpoint(self.resume)
        else:
            trainer.train(resume_from_checkpoint=self.resume)
        if interrupt.progress.pending is not None:  # --save_on_interrupt: the checkpoint of this step is saved
            interrupt.stop()
        if self.guard.stopped:
            raise UserError(f"stopping: {self.guard.consecutive} optimizer steps in a row had non-finite gradients "
                            f"(skipped, the weights are untouched); the checkpoints in {self.output_dir} are intact, "
                            "no final model was saved")

    def save_model(self, trainer) -> str:
        """The trained model into the temporary final folder (every process takes part: sharded states)."""
        tmp = final_tmp_dir(self.output_dir)
        with writing(f"the final model to {tmp}"):
            trainer.save_model(tmp)
        trainer.accelerator.wait_for_everyone()
        return tmp

    def commit(self, tmp: str, tokenizer, card: dict) -> None:
        """Main process: the tokenizer next to the model, everything moved into ``--output_dir`` (the model's config
        file last), and the model card (``card``: ``write_model_card``'s stage, base_model, dataset, metrics and
        optional notes)."""
        if not self.is_main:
            return
        with writing(f"the final model to {self.output_dir}"):
            tokenizer.save_pretrained(tmp)
            if os.path.isfile(os.path.join(tmp, "training_args.bin")):
                os.remove(os.path.join(tmp, "training_args.bin"))  # a pickle; run_args.yaml holds the same, readably
            commit_final(tmp, self.output_dir)
            write_model_card(self.output_dir, **card)


class InterruptCallback(TrainerCallback):
    """Keeps ``common.interrupt`` told of the step; with ``--save_on_interrupt``, a signal makes the Trainer save a
    checkpoint at the end of the step and stop (``TrainerStage.train`` then ends the run with the interrupt line)."""

    def on_step_end(self, args, state, control, **kwargs):
        interrupt.progress.step = state.global_step
        if interrupt.progress.save_on_interrupt and interrupt.requested(args.device):
            control.should_save = control.should_training_stop = True


class TimeLimit(TrainerCallback):
    """Stops training after the first optimizer step that ends ``seconds`` or more after training began (this
    process's clock from ``on_train_begin``, so a resumed run gets the whole budget again). With several processes
    the main process's decision is broadcast, so all stop at the same step. ``stopped_at`` is that step, or None."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.stopped_at = seconds, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor([float(time.monotonic() - self.start >= self.seconds)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(over, src=0)
        if over.item():
            control.should_training_stop = True
            self.stopped_at = state.global_step
