r"""Stage 1: supervised fine-tuning on `question` / `response_j` with TRL's SFTTrainer (LoRA by default).

    # the offline demo: tiny model, sample data, CPU
    python -m common.tiny_model --output_dir models/tiny
    python training_sft.py --model_name_or_path models/tiny --dataset_name . --subset data/finetune \
        --size_valid_set 200 --seq_length 256 --max_steps 60 --eval_freq 20 --save_freq 30 --output_dir runs/sft

    # StackLLaMA's command runs unchanged
    torchrun --nnodes 1 --nproc_per_node 8 training_sft.py --model_path=<BASE> --streaming \
        --learning_rate 1e-5 --max_steps 5000 --output_dir ./llama-se

    # from Python (a notebook): the flags as keyword arguments; returns the folder and the final metrics
    from training_sft import run_sft
    sft = run_sft(model_name_or_path="models/tiny", dataset_name=".", max_steps=60, output_dir="runs/sft")

Each example is `Question: {question}\n\nAnswer: {response_j}</s>` (common/prompts.py). Other layouts are detected from
the columns (`prompt`/`completion`, conversational `messages`, plain `text`; `--columns` maps other names; see
common/layouts.py): a conversation goes through the tokenizer's chat template, or the project's template without one,
and `--assistant_only_loss` trains on every assistant turn instead of the last one. By default examples are
packed end to end into `--seq_length` blocks (`--packing_strategy wrapped`, StackLLaMA's constant-length
packing with plain causal attention) and the loss is on the answer tokens only (`--completion_only_loss true`;
`false` trains on the question too, as StackLLaMA did). Without packing, examples longer than `--seq_length`
are truncated and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import common.quiet  # noqa: F401  (first: silences known library messages)

from transformers import IntervalStrategy
from trl import SFTConfig, SFTTrainer

from common.cli import StageResult, UserError, call_stage, collect, parse_args, run
from common.fields import data_dir_field, dataset_name_field, overwrite_output_dir_field, split_field
from common.flag_checks import trainer_flag_problems, trainer_validation
from common.interrupt import save_on_interrupt_field
from common.layouts import Layout, columns_field, load_normalized
from common.modeling import (
    ModelArguments,
    check_model_path,
    check_vocabulary,
    load_model,
    load_tokenizer,
    lora_config,
    plain_lm_head,
    set_chat_template,
    set_eos_token,
    trainer_device_defaults,
)
from common.outputs import AtomicCheckpoints
from common.prompts import TemplateError, conversation_segments, tokenize_segments
from common.stage import TrainerStage

FIELDS = ["question", "response_j"]  # the StackLLaMA layout (common/layouts.py lists the others)


@dataclass
class ScriptArguments:
    dataset_name: str = dataset_name_field(reads="The training rows")
    subset: str = data_dir_field("data/finetune", "the training rows")
    split: str = split_field("the training rows (the validation rows are held out of it)")
    size_valid_set: int = field(default=4000, metadata={"help": "Rows held out of --split for evaluation (0: none)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data set instead of downloading it whole."})
    shuffle_buffer: int = field(default=5000, metadata={"help": "Shuffle buffer size when streaming."})
    eos_token_id: int | None = field(
        default=None,
        metadata={"help": "EOS id to end each example with (default: the tokenizer's)."},
    )
    overwrite_output_dir: bool = overwrite_output_dir_field()
    eval_first_step: bool = field(
        default=False,
        metadata={"help": "Evaluate once before training (the baseline eval loss)."},
    )
    columns: list[str] | None = columns_field()
    save_on_interrupt: bool = save_on_interrupt_field()
    lm_head: str = field(
        default="auto",
        metadata={"help": "How the loss is taken from the LM head: 'fused' (TRL's chunked head, no [tokens, vocab] "
                          "logits kept), 'plain' (full logits, faster without Triton), 'auto' (plain on CPU).",
                  "choices": ["auto", "fused", "plain"]},
    )


# StackLLaMA's flags, kept as aliases of the Hugging Face names (docs/stackllama.md, "training_sft.py").
ALIASES = {
    "--model_path": "model_name_or_path",
    "--model_name": "model_name_or_path",
    "--seq_length": "max_length",
    "--batch_size": "per_device_train_batch_size",
    "--num_warmup_steps": "warmup_steps",
    "--num_workers": "dataloader_num_workers",
    "--log_freq": "logging_steps",
    "--eval_freq": "eval_steps",
    "--save_freq": "save_steps",
}


# StackLLaMA's historical defaults, then this project's (packing, answer-only loss, no reporting by default).
DEFAULTS = {
    "learning_rate": 1e-4, "max_steps": 10000, "per_device_train_batch_size": 4, "max_length": 1024,
    "lr_scheduler_type": "cosine", "warmup_steps": 100, "weight_decay": 0.05, "output_dir": "./checkpoints",
    "logging_steps": 1, "eval_steps": 1000, "save_steps": 1000, "seed": 0, "eval_strategy": "steps",
    "packing": True, "packing_strategy": "wrapped", "completion_only_loss": True, "report_to": "none",
    "per_device_eval_batch_size": 4,
}


def check_args(script: ScriptArguments, config: SFTConfig) -> None:
    problems = []
    if config.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {config.learning_rate}")
    if config.max_steps == 0 or (config.max_steps < 0 and config.num_train_epochs <= 0):
        problems.append(f"--max_steps must be > 0 (or -1 with --num_train_epochs > 0), got {config.max_steps}")
    if config.max_length is None or config.max_length <= 0:
        problems.append(f"--seq_length/--max_length must be > 0, got {config.max_length}")
    if script.size_valid_set < 0:
        problems.append(f"--size_valid_set must be >= 0, got {script.size_valid_set}")
    if script.streaming and config.max_steps <= 0:
        problems.append("--streaming needs --max_steps > 0 (a stream has no length to count epochs by)")
    if config.per_device_train_batch_size <= 0:
        problems.append(f"--batch_size/--per_device_train_batch_size must be > 0, "
                        f"got {config.per_device_train_batch_size}")
    if config.dataset_kwargs:
        problems.append("--dataset_kwargs: this script tokenizes and masks the data itself (common/layouts.py), so "
                        "TRL's data set options (skip_prepare_dataset) do not apply: drop it")
    problems += trainer_flag_problems(config)
    collect(problems)


def split_valid(loaded, script: ScriptArguments):
    """Hold `--size_valid_set` rows out of the training split (StackLLaMA's take/skip when streaming)."""
    ds = loaded.dataset
    if script.streaming:
        from datasets import Dataset

        valid = Dataset.from_list(list(ds.take(script.size_valid_set))) if script.size_valid_set else None
        return ds.skip(script.size_valid_set).shuffle(buffer_size=script.shuffle_buffer, seed=0), valid
    if script.size_valid_set == 0:
        return ds, None
    if script.size_valid_set >= len(ds):
        collect([f"--size_valid_set {script.size_valid_set} leaves no training rows: {loaded.source} has "
                 f"{len(ds)} rows"])
    parts = ds.train_test_split(test_size=script.size_valid_set, seed=0)
    return parts["train"], parts["test"]


def segments(tokenizer, row: dict, assistant_only: bool) -> list[tuple[str, bool]]:
    """A normalized row's text as (piece, trained) pieces: the prompt (never trained), then the answer; a
    conversation turn by turn, every assistant turn trained with ``assistant_only``, else its last one."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(completion, str):
        return [(prompt, False), (completion, True)] if prompt else [(completion, True)]
    conversation = list(prompt) + list(completion)
    return conversation_segments(tokenizer, conversation, len(prompt), assistant_only)


def tokenize(ds, tokenizer, streaming: bool, assistant_only: bool = False):
    """``input_ids`` and ``completion_mask`` of every normalized row (``common.prompts.tokenize_segments``): for the
    StackLLaMA layout the prompt's ids, then the answer's, then EOS, as PPO later generates."""
    def fn(row):
        try:
            return tokenize_segments(tokenizer, segments(tokenizer, row, assistant_only))
        except TemplateError as e:
            raise UserError(f"--model_name_or_path/--tokenizer_name: {e}") from e

    kwargs = {} if streaming else {"desc": "Tokenizing"}
    return ds.map(fn, remove_columns=list(ds.column_names or []), **kwargs)


def check_layout(layout: Layout, config: SFTConfig) -> None:
    if config.assistant_only_loss and not layout.conversational:
        raise UserError(f"--assistant_only_loss needs conversations (a messages column, or prompt/completion as lists "
                        f"of messages); the data's {layout.describe()}")


class Trainer(AtomicCheckpoints, SFTTrainer):
    """TRL's SFTTrainer, with checkpoints written under a temporary name and renamed."""


def build_trainer(script: ScriptArguments, config: SFTConfig, model_args: ModelArguments, tokenizer, train_ds,
                  *, eval_ds=None, callbacks=()) -> Trainer:
    """The model and `SFTTrainer` as the stage trains them (benchmarks/run.py times this same object)."""
    model = load_model(model_args, "CAUSAL_LM", config.trust_remote_code, tokenizer.pad_token_id)
    check_vocabulary(tokenizer, model, model_args.tokenizer_name or model_args.model_name_or_path,
                     model_args.model_name_or_path, "--tokenizer_name", model_flag="--model_name_or_path")
    with trainer_validation():  # TRL's checks of its flags against the model (--router_aux_loss_coef)
        trainer = Trainer(
            model=model,
            args=config,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora_config(model_args, "CAUSAL_LM"),
            callbacks=list(callbacks),
        )
    if script.lm_head == "plain" or (script.lm_head == "auto" and trainer.args.device.type == "cpu"):
        plain_lm_head(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model)
    return trainer


def main(script: ScriptArguments, config: SFTConfig, model_args: ModelArguments) -> StageResult:
    check_args(script, config)
    check_model_path(model_args.model_name_or_path or "", "--model_name_or_path",
                     base_override=model_args.base_model_name_or_path)
    stage = TrainerStage(config, script.overwrite_output_dir, script.save_on_interrupt)

    # Data first: a bad row should cost seconds, not a model load.
    columns = script.columns
    if not columns and config.dataset_text_field != "text":  # TRL's name for the text column
        columns = [f"text={config.dataset_text_field}"]
    loaded, layout = load_normalized("sft", script.dataset_name, script.subset, script.split, columns,
                                     streaming=script.streaming)
    check_layout(layout, config)
    train_rows, valid_rows = split_valid(loaded, script)
    if valid_rows is None:
        config.eval_strategy = IntervalStrategy.NO

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or "",
                               config.trust_remote_code, "right")
    if script.eos_token_id is not None:
        if not 0 <= script.eos_token_id < len(tokenizer):
            raise UserError(f"--eos_token_id {script.eos_token_id} is not a token id of the tokenizer "
                            f"(0 to {len(tokenizer) - 1})")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(script.eos_token_id)
    set_eos_token(tokenizer, config.eos_token)  # SFTTrainer would switch only after the examples are tokenized
    set_chat_template(tokenizer, config.chat_template_path)  # likewise
    if stage.is_main:
        print(f"data: {loaded.source}, {layout.describe(tokenizer)}")
    # The answer-only mask of every layout is ours (tokenize): TRL's assistant_only_loss needs its own chat-template
    # markers and the raw messages, so the trainer gets the mask as `completion_mask` and the flag only for the record.
    assistant_only, completion_only = config.assistant_only_loss, config.completion_only_loss
    if assistant_only:
        config.assistant_only_loss, config.completion_only_loss = False, True
    train_ds = tokenize(train_rows, tokenizer, script.streaming, assistant_only)
    eval_ds = tokenize(valid_rows, tokenizer, False, assistant_only) if valid_rows is not None else None
    if not script.streaming and stage.is_main:
        lengths = [len(ids) for ids in train_ds["input_ids"]]
        over = sum(n > config.max_length for n in lengths)
        what = "span two packed blocks" if config.packing else "are truncated"
        print(f"train: {len(lengths)} examples, {sum(lengths)} tokens; {over} longer than --seq_length "
              f"{config.max_length} {what}")

    trainer = build_trainer(script, config, model_args, tokenizer, train_ds, eval_ds=eval_ds, callbacks=stage.callbacks)
    config.assistant_only_loss, config.completion_only_loss = assistant_only, completion_only
    stage.begin(script, model_args, config, trainer=trainer, tokenizer=tokenizer, stage="SFT")
    if script.eval_first_step and eval_ds is not None and not stage.resume:
        trainer.evaluate()
    stage.train(trainer)
    if eval_ds is not None and trainer.state.global_step % config.eval_steps != 0:
        trainer.evaluate()  # the final eval loss, if the last step was not an eval step

    tmp = stage.save_model(trainer)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    metrics = {"steps": trainer.state.global_step, "train_loss_first": losses[0] if losses else None,
               "train_loss_last": losses[-1] if losses else None, "eval_loss_first": evals[0] if evals else None,
               "eval_loss_last": evals[-1] if evals else None}
    stage.commit(tmp, tokenizer, {
        "stage": "SFT " + ("LoRA adapter" if model_args.use_peft else "model"),
        "base_model": model_args.model_name_or_path,
        "dataset": f"{script.dataset_name} ({script.subset}, {script.split})",
        "metrics": metrics,
    })
    if stage.is_main:
        print(f"saved to {config.output_dir}")
    return StageResult(config.output_dir, metrics if stage.is_main else {})


def parse(argv: list[str] | None = None, kwargs: dict | None = None
          ) -> tuple[ScriptArguments, SFTConfig, ModelArguments]:
    return parse_args((ScriptArguments, SFTConfig, ModelArguments), ALIASES,
                      {**DEFAULTS, **trainer_device_defaults()}, argv, __doc__, kwargs=kwargs)


def run_sft(**kwargs) -> StageResult:
    """Stage 1 from Python: the keyword arguments are the flags without their dashes, with the same defaults and
    checks (StackLLaMA's names too; ``config="run.yaml"`` reads a YAML of them)::

        from training_sft import run_sft
        sft = run_sft(model_name_or_path="models/tiny-pretrained", dataset_name=".", subset="data/finetune",
                      max_steps=60, output_dir="runs/sft")
        sft.output_dir, sft.metrics["eval_loss_last"]

    Returns the output folder and the model card's metrics; a mistake raises ``common.cli.UserError``."""
    return call_stage("training_sft.run_sft", parse, main, kwargs)


if __name__ == "__main__":
    run(lambda: main(*parse()))
