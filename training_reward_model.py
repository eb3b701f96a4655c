r"""Stage 2: a pairwise reward model on `question` / `response_j` (preferred) / `response_k` (rejected) with TRL's
RewardTrainer (LoRA by default), and a report of how good it is.

    # the offline demo: tiny model, sample data, CPU
    python -m common.tiny_model --output_dir models/tiny
    python training_reward_model.py --model_name_or_path models/tiny --dataset_name . --max_length 256 \
        --per_device_train_batch_size 8 --learning_rate 1e-3 --max_steps 60 --eval_steps 20 --output_dir runs/rm

    # StackLLaMA's command runs unchanged
    torchrun --nnodes 1 --nproc_per_node 8 training_reward_model.py --model_name=<SFT_MODEL>

    # from Python (a notebook): the flags as keyword arguments; returns the folder and the final metrics
    from training_reward_model import run_reward_model
    rm = run_reward_model(model_name="runs/sft_merged", dataset_name=".", max_steps=60, output_dir="runs/rm")

Both answers are scored as `Question: {question}\n\nAnswer: {answer}</s>` (common/prompts.py, the text SFT trains on
and PPO scores) at the last non-pad token; the loss is `-logsigmoid(r_j - r_k - margin)` (`--margin`, default 0),
plus `--center_rewards_coefficient * (r_j + r_k)^2` if set. Pairs with either side longer than `--max_length`
tokens are dropped (truncating would cut the very part that tells the answers apart) and counted.
Evaluation batches like training (`--per_device_eval_batch_size` defaults to the train batch size). After training
the final model scores the evaluation pairs once more for `eval_report.{json,md}` (accuracy by margin,
calibration, length bias, worst pairs) and `reward_stats.json` (mean and std of scores, for PPO), see
common/rm_eval.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import common.quiet  # noqa: F401  (first: silences known library messages)

import torch
from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from common.cli import StageResult, UserError, call_stage, collect, parse_args, run
from common.fields import data_dir_field, dataset_name_field, overwrite_output_dir_field, split_field
from common.flag_checks import trainer_flag_problems, trainer_validation
from common.interrupt import save_on_interrupt_field
from common.layouts import answer_display, columns_field, completion_text, load_pairs
from common.modeling import (
    ModelArguments,
    check_model_path,
    check_vocabulary,
    load_model,
    load_tokenizer,
    lora_config,
    set_chat_template,
    set_eos_token,
    trainer_device_defaults,
)
from common.outputs import AtomicCheckpoints
from common.prompts import TemplateError, encode, ends_with_eos, render_prompt
from common.rm_eval import pair_report, score_pairs, write_report
from common.stage import TrainerStage

FIELDS = ["question", "response_j", "response_k"]  # the StackLLaMA layout (common/layouts.py lists the others)


@dataclass
class ScriptArguments:
    dataset_name: str = dataset_name_field(reads="The preference pairs")
    train_data_dir: str = data_dir_field("data/reward", "the training pairs")
    eval_data_dir: str = data_dir_field("data/evaluation", "the evaluation pairs")
    split: str = split_field("both data dirs")
    train_subset: int = field(default=100000, metadata={"help": "Use the first N training pairs (<= 0: all)."})
    eval_subset: int = field(default=50000, metadata={"help": "Use the first N evaluation pairs (<= 0: all)."})
    margin: float = field(
        default=0.0,
        metadata={"help": "Constant margin m in the loss -logsigmoid(r_j - r_k - m): r_j must beat r_k by m "
                          "(0: none)."},
    )
    overwrite_output_dir: bool = overwrite_output_dir_field()
    eval_first_step: bool = field(
        default=False,
        metadata={"help": "Evaluate once before training (the untrained baseline)."},
    )
    columns: list[str] | None = columns_field()
    save_on_interrupt: bool = save_on_interrupt_field()


ALIASES = {"--model_name": "model_name_or_path"}  # StackLLaMA's other flags are the Hugging Face names already


# StackLLaMA's historical defaults (docs/stackllama.md), then this project's: evaluation batches like training
# (None: the train batch size, resolved in main), no reporting by default. TRL's RewardConfig turns every dropout
# off, LoRA's included (after peft builds the model); StackLLaMA trained with them on, and so does this script, or
# the LoRA dropout of 0.1 would be a dead setting.
DEFAULTS = {
    "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "disable_dropout": False,
    "learning_rate": 2e-5, "per_device_train_batch_size": 4, "per_device_eval_batch_size": None,
    "weight_decay": 0.001, "num_train_epochs": 1, "lr_scheduler_type": "linear", "max_length": 512,
    "output_dir": "./reward_model", "eval_strategy": "steps", "eval_steps": 500, "save_strategy": "steps",
    "save_steps": 500, "logging_steps": 10, "seed": 0, "report_to": "none",
}


def check_args(script: ScriptArguments, config: RewardConfig) -> None:
    problems = []
    if config.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {config.learning_rate}")
    if config.max_steps == 0:
        problems.append("--max_steps must be > 0 (or -1, the default, to train --num_train_epochs epochs), got 0")
    elif config.max_steps < 0 and config.num_train_epochs <= 0:
        problems.append(f"--num_train_epochs must be > 0 (or --max_steps > 0), got {config.num_train_epochs}")
    if config.max_length is None or config.max_length <= 0:
        problems.append(f"--max_length must be > 0, got {config.max_length}")
    if config.per_device_train_batch_size <= 0:
        problems.append(f"--per_device_train_batch_size must be > 0, got {config.per_device_train_batch_size}")
    if config.per_device_eval_batch_size is not None and config.per_device_eval_batch_size <= 0:
        problems.append(f"--per_device_eval_batch_size must be > 0, got {config.per_device_eval_batch_size}")
    problems += trainer_flag_problems(config, pairs=True)
    collect(problems)
    if script.margin < 0:
        warnings.warn(f"--margin {script.margin} is negative: pairs count as learned before r_j beats r_k",
                      stacklevel=2)


def pair_texts(tokenizer, rows, side: str) -> list[str]:
    """The whole text of each normalized pair's ``side`` answer (``chosen`` or ``rejected``): the prompt's text and
    the answer's, as PPO and evaluate.py score a generated answer (``common.prompts.render_answer``)."""
    try:
        return [render_prompt(tokenizer, p) + completion_text(tokenizer, p, a)
                for p, a in zip(rows["prompt"], rows[side])]
    except TemplateError as e:
        raise UserError(f"--model_name_or_path/--tokenizer_name: {e}") from e


def tokenize_pairs(rows, tokenizer, script: ScriptArguments, max_length: int, name: str, *, verbose: bool):
    """`chosen_ids`/`rejected_ids` exactly as RewardTrainer makes them (text + EOS, special tokens added), so it
    skips its own tokenizing; pairs over `max_length` dropped here, so the count can be reported. Returns the
    tokenized pairs and the kept rows (the text, for the evaluation report)."""
    eos = tokenizer.eos_token

    def fn(batch):
        out = {}
        for key, side in (("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
            out[key] = [encode(tokenizer, t if ends_with_eos(tokenizer, t) else t + eos)
                        for t in pair_texts(tokenizer, batch, side)]
        out["n_tokens"] = [max(len(c), len(r)) for c, r in zip(out["chosen_ids"], out["rejected_ids"])]
        if script.margin:
            out["margin"] = [script.margin] * len(batch["question"])
        return out

    ds = rows.map(fn, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {name} pairs")
    keep = [i for i, n in enumerate(ds["n_tokens"]) if n <= max_length]
    if verbose:
        print(f"{name}: {len(ds)} pairs; {len(ds) - len(keep)} longer than --max_length {max_length} tokens dropped")
    if not keep:
        collect([f"every {name} pair is longer than --max_length {max_length} tokens"])
    return ds.select(keep).remove_columns("n_tokens"), rows.select(keep)


def load_rows(script: ScriptArguments, data_dir: str, subset: int):
    return load_pairs(script.dataset_name, data_dir, script.split, subset, script.columns)


class Trainer(AtomicCheckpoints, RewardTrainer):
    """TRL's RewardTrainer, with checkpoints written under a temporary name and renamed."""


def build_trainer(config: RewardConfig, model_args: ModelArguments, tokenizer, train_ds, eval_ds=None,
                  *, callbacks=()) -> Trainer:
    """The model and `RewardTrainer` as the stage trains them (benchmarks/run.py times this same object)."""
    set_seed(config.seed)  # the score head is initialised at random when the classifier is built
    model = load_model(model_args, "SEQ_CLS", config.trust_remote_code, tokenizer.pad_token_id)
    check_vocabulary(tokenizer, model, model_args.tokenizer_name or model_args.model_name_or_path,
                     model_args.model_name_or_path, "--tokenizer_name", model_flag="--model_name_or_path")
    with trainer_validation():
        trainer = Trainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=lora_config(model_args, "SEQ_CLS"),
                          callbacks=list(callbacks))
    if model_args.load_in_4bit or model_args.load_in_8bit:
        # TRL casts a quantized model's trainable weights to bfloat16 (QLoRA). LoRA's layers cast their input; the
        # score head does not, and meets hidden states of the model's own dtype (float32 on CPU): it keeps that dtype.
        dtype = model.get_input_embeddings().weight.dtype
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and ".score." in f".{name}" and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return trainer


def main(script: ScriptArguments, config: RewardConfig, model_args: ModelArguments) -> StageResult:
    check_args(script, config)
    check_model_path(model_args.model_name_or_path or "", "--model_name_or_path",
                     base_override=model_args.base_model_name_or_path)
    stage = TrainerStage(config, script.overwrite_output_dir, script.save_on_interrupt)
    if config.per_device_eval_batch_size is None:
        config.per_device_eval_batch_size = config.per_device_train_batch_size

    # Data first: a bad row should cost seconds, not a model load.
    train_rows, train_layout = load_rows(script, script.train_data_dir, script.train_subset)
    eval_rows, eval_layout = load_rows(script, script.eval_data_dir, script.eval_subset)
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or "",
                               config.trust_remote_code, "right")
    if stage.is_main:
        print(f"data: train {train_layout.describe(tokenizer)}; eval {eval_layout.describe(tokenizer)}")
    set_eos_token(tokenizer, config.eos_token)  # RewardTrainer would switch only after the pairs below are tokenized
    set_chat_template(tokenizer, config.chat_template_path)  # likewise
    train_ds, _ = tokenize_pairs(train_rows, tokenizer, script, config.max_length, "train", verbose=stage.is_main)
    eval_ds, eval_rows = tokenize_pairs(eval_rows, tokenizer, script, config.max_length, "eval", verbose=stage.is_main)

    trainer = build_trainer(config, model_args, tokenizer, train_ds, eval_ds, callbacks=stage.callbacks)
    stage.begin(script, model_args, config, trainer=trainer, tokenizer=tokenizer, stage="reward model")
    if script.eval_first_step and not stage.resume:
        trainer.evaluate()
    stage.train(trainer)
    if not any(h.get("step") == trainer.state.global_step and "eval_loss" in h for h in trainer.state.log_history):
        trainer.evaluate()  # the final eval metrics, if the last step was not an eval step

    tmp = stage.save_model(trainer)
    # The report scores the final model afresh, pair by pair with common/reward.py as PPO will, rather than trust
    # RewardTrainer's per-batch averages.
    r_j, r_k = score_pairs(trainer.model, tokenizer, pair_texts(tokenizer, eval_rows, "chosen"),
                           pair_texts(tokenizer, eval_rows, "rejected"), config.per_device_eval_batch_size,
                           accelerator=trainer.accelerator)
    trainer.accelerator.wait_for_everyone()
    if not stage.is_main:
        return StageResult(config.output_dir, {})
    kinds = eval_rows["pair_kind"] if "pair_kind" in eval_rows.column_names else None
    report = pair_report(eval_rows["question"], [answer_display(a) for a in eval_rows["chosen"]],
                         [answer_display(a) for a in eval_rows["rejected"]], r_j, r_k, kinds=kinds)
    all_scores = torch.cat([r_j, r_k])
    stats = {"mean": float(all_scores.mean()), "std": float(all_scores.std(unbiased=False)), "n": len(all_scores),
             "what": f"scores of both answers of the {len(r_j)} evaluation pairs ({script.eval_data_dir})"}
    write_report(tmp, report, stats)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {"steps": trainer.state.global_step, "train_loss_last": losses[-1] if losses else None,
               "eval_pairs": report["n_pairs"], "eval_accuracy": report["accuracy"],
               "eval_mean_margin": report["mean_margin"], "ece": report["ece"],
               "length_correlation_all": report["length_correlation"]["all"],
               "score_mean": stats["mean"], "score_std": stats["std"],
               **({"eval_accuracy_lookalike": report["accuracy_lookalike"]} if kinds else {})}
    stage.commit(tmp, tokenizer, {
        "stage": "Reward model " + ("LoRA adapter" if model_args.use_peft else "(full fine-tuning)"),
        "base_model": model_args.model_name_or_path,
        "dataset": f"{script.dataset_name} ({script.train_data_dir} / {script.eval_data_dir}, {script.split})",
        "metrics": metrics,
        "notes": "\nHow good it is: `eval_report.md`. Score statistics for PPO's normalisation: `reward_stats.json`.\n",
    })
    lookalike = (f" (look-alike pairs {report['accuracy_lookalike']:.4f} on {report['n_lookalike']})"
                 if report.get("accuracy_lookalike") is not None else "")
    print(f"eval accuracy {report['accuracy']:.4f} on {report['n_pairs']} pairs{lookalike}, ECE {report['ece']:.4f}; "
          f"saved to {config.output_dir}")
    return StageResult(config.output_dir, metrics)


def parse(argv: list[str] | None = None, kwargs: dict | None = None
          ) -> tuple[ScriptArguments, RewardConfig, ModelArguments]:
    return parse_args((ScriptArguments, RewardConfig, ModelArguments), ALIASES,
                      {**DEFAULTS, **trainer_device_defaults()}, argv, __doc__, kwargs=kwargs)


def run_reward_model(**kwargs) -> StageResult:
    """Stage 2 from Python: the keyword arguments are the flags without their dashes, with the same defaults and
    checks (StackLLaMA's names too; ``config="run.yaml"`` reads a YAML of them)::

        from training_reward_model import run_reward_model
        rm = run_reward_model(model_name="runs/sft_merged", dataset_name=".", max_steps=100, output_dir="runs/rm")
        rm.metrics["eval_accuracy"]

    Returns the output folder and the model card's metrics; a mistake raises ``common.cli.UserError``."""
    return call_stage("training_reward_model.run_reward_model", parse, main, kwargs)


if __name__ == "__main__":
    run(lambda: main(*parse()))
