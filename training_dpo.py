r"""DPO on `question` / `response_j` (preferred) / `response_k` (rejected) with TRL's DPOTrainer: the StackLLaMA-2
alternative to the reward model and PPO (stages 2-3), LoRA by default, the reference being the policy with its
adapter disabled (no second copy of the model).

    # the offline demo: from the SFT model of the pipeline, on the reward model's training pairs
    python training_dpo.py --model_name_or_path runs/pipeline/sft_merged --dataset_name . \
        --train_data_dir data/reward --max_steps 100 --eval_steps 50 --output_dir runs/dpo

    # StackLLaMA-2's command runs unchanged (its dpo_llama2.py flags are accepted)
    accelerate launch training_dpo.py --model_name_or_path=sft/final_checkpoint --output_dir=dpo

    # from Python (a notebook): the flags as keyword arguments; returns the folder and the final metrics
    from training_dpo import run_dpo
    dpo = run_dpo(model_name_or_path="runs/pipeline/sft_merged", dataset_name=".", output_dir="runs/dpo")

Each pair is the prompt `Question: {question}\n\nAnswer: ` and the two answers, each followed by EOS, tokenized as SFT
tokenizes them and as PPO generates (common/prompts.py): the prompt's ids, then the answer's. The loss is TRL's
(`--loss_type`, default `sigmoid`: `-logsigmoid(beta * ((log pi(y_j) - log ref(y_j)) - (log pi(y_k) - log ref(y_k))))`,
log-probs summed over the answer tokens). Pairs whose prompt is longer than `--max_prompt_length` tokens, or whose
prompt and either answer are longer than `--max_length` tokens, are dropped and counted (StackLLaMA-2 counted
characters; truncating would cut the part of the answers that tells them apart).

The model argument may be the SFT adapter folder (merged in memory) or the merged SFT model. With LoRA the reference
is that model with the new adapter disabled; with `--use_peft false` a frozen copy is loaded. Dropout is off by
default (`--disable_dropout`, TRL's default): with it on, the policy's and the reference's log-probs would differ by
dropout noise at step 0, so `--lora_dropout` has an effect only with `--disable_dropout false`.

After training, the final model scores the evaluation pairs with DPO's implicit reward
`beta * (log pi(y) - log ref(y))` for `eval_report.{json,md}` (accuracy overall and on the look-alike pairs,
calibration, length bias, worst pairs: the reward model stage's report, common/rm_eval.py).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import common.quiet  # noqa: F401  (first: silences known library messages)

import torch
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

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
    plain_lm_head,
    trainer_device_defaults,
)
from common.outputs import AtomicCheckpoints
from common.prompts import TemplateError, encode, render_prompt, tokenize_segments
from common.rm_eval import pair_report, write_report
from common.stage import TimeLimit, TrainerStage


@dataclass
class ScriptArguments:
    dataset_name: str = dataset_name_field(reads="The preference pairs")
    train_data_dir: str = field(default="data/rl", metadata={"help": "The data_dir of the training pairs "
                                                                     "(StackLLaMA-2 trained on data/rl)."})
    eval_data_dir: str = data_dir_field("data/evaluation", "the evaluation pairs")
    split: str = split_field("both data dirs")
    train_subset: int = field(default=0, metadata={"help": "Use the first N training pairs (<= 0: all)."})
    eval_subset: int = field(default=1000, metadata={"help": "Use the first N evaluation pairs (<= 0: all)."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Pairs whose prompt is longer than this many tokens are dropped (and counted). Default: half "
                          "of --max_length (512 with StackLLaMA-2's 1024)."},
    )
    overwrite_output_dir: bool = overwrite_output_dir_field()
    columns: list[str] | None = columns_field()
    save_on_interrupt: bool = save_on_interrupt_field()
    eval_first_step: bool = field(
        default=False,
        metadata={"help": "Evaluate once before training (the reference's own margins are 0: accuracy 0)."},
    )
    lm_head: str = field(
        default="auto",
        metadata={"help": "How log-probs are taken from the LM head: 'fused' (TRL's chunked head), 'plain' (full "
                          "logits, faster without Triton), 'auto' (plain on CPU).",
                  "choices": ["auto", "fused", "plain"]},
    )
    max_train_seconds: float = field(
        default=0.0,
        metadata={"help": "Stop after the first optimizer step that ends this many seconds into training and save "
                          "that model as the final one (0: no limit; --max_steps still sets the LR schedule). Used "
                          "to give DPO the training time of an RL run (benchmarks/compare_methods.py)."},
    )


# StackLLaMA-2's dpo_llama2.py flags whose names differ from the Hugging Face ones (docs/stackllama.md).
ALIASES = {
    "--model_name": "model_name_or_path",
    "--model_dtype": "dtype",
    "--optimizer_type": "optim",
}


# StackLLaMA-2's defaults (docs/stackllama.md), then this project's: evaluation batches like training (None: the train
# batch size, resolved in main), no reporting, and 4-bit loading only when asked (--load_in_4bit; StackLLaMA-2
# always loaded 4-bit, which on a CPU or a small model costs time for nothing).
DEFAULTS = {
    "beta": 0.1, "learning_rate": 5e-4, "lr_scheduler_type": "cosine", "warmup_steps": 100, "weight_decay": 0.05,
    "per_device_train_batch_size": 4, "per_device_eval_batch_size": None, "gradient_accumulation_steps": 4,
    "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "max_length": 1024, "max_steps": 1000,
    "logging_steps": 10, "save_steps": 100, "eval_steps": 100, "eval_strategy": "steps", "save_strategy": "steps",
    "output_dir": "./results", "seed": 0, "report_to": "none",
}


def device_defaults() -> dict:
    """`trainer_device_defaults`, and StackLLaMA-2's paged AdamW where it exists (bitsandbytes' paged optimizers
    need a GPU; a CPU run uses plain AdamW)."""
    return {**trainer_device_defaults(), "optim": "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"}


def check_args(script: ScriptArguments, config: DPOConfig) -> None:
    problems = []
    if config.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {config.learning_rate}")
    if config.beta <= 0:
        problems.append(f"--beta must be > 0, got {config.beta}")
    if config.max_steps == 0:
        problems.append("--max_steps must be > 0 (or -1 to train --num_train_epochs epochs), got 0")
    elif config.max_steps < 0 and config.num_train_epochs <= 0:
        problems.append(f"--num_train_epochs must be > 0 (or --max_steps > 0), got {config.num_train_epochs}")
    if config.max_length is None or config.max_length <= 0:
        problems.append(f"--max_length must be > 0, got {config.max_length}")
    if script.max_prompt_length is None and config.max_length is not None:
        script.max_prompt_length = max(config.max_length // 2, 1)
    if script.max_prompt_length is None or script.max_prompt_length <= 0:
        problems.append(f"--max_prompt_length must be > 0, got {script.max_prompt_length}")
    elif config.max_length is not None and script.max_prompt_length >= config.max_length:
        problems.append(f"--max_prompt_length {script.max_prompt_length} leaves no room for an answer within "
                        f"--max_length {config.max_length}")
    if config.per_device_train_batch_size <= 0:
        problems.append(f"--per_device_train_batch_size must be > 0, got {config.per_device_train_batch_size}")
    if config.per_device_eval_batch_size is not None and config.per_device_eval_batch_size <= 0:
        problems.append(f"--per_device_eval_batch_size must be > 0, got {config.per_device_eval_batch_size}")
    if script.max_train_seconds < 0:
        problems.append(f"--max_train_seconds must be >= 0 (0: no limit), got {script.max_train_seconds}")
    if config.precompute_ref_log_probs:
        problems.append("--precompute_ref_log_probs is not supported here: with LoRA the reference is the model with "
                        "its adapter disabled, which costs no memory")
    for name, given in (("loss_type", config.loss_type), ("f_divergence_type", [config.f_divergence_type])):
        known = listed_values(DPOConfig, name)  # TRL checks these only at the first step
        unknown = [str(getattr(v, "value", v)) for v in given if known and str(getattr(v, "value", v)) not in known]
        if unknown:
            problems.append(f"--{name} {' '.join(unknown)}: not one of {', '.join(known)}")
    if "exo_pair" in config.loss_type and config.label_smoothing <= 0:
        problems.append("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper recommends 1e-3)")
    problems += trainer_flag_problems(config, pairs=True)
    collect(problems)


def listed_values(config_cls, name: str) -> list[str]:
    """The values the help of a TRL config field lists ("Possible values are: `'a'`, `'b'`. ..."), or none."""
    text = next((f.metadata.get("help", "") for f in dataclasses.fields(config_cls) if f.name == name), "")
    if "Possible values are:" not in text:
        return []
    return re.findall(r"`'?([\w-]+)'?`", text.split("Possible values are:", 1)[1].split(". ", 1)[0])


def tokenize_pairs(rows, tokenizer, script: ScriptArguments, max_length: int, name: str, *, verbose: bool,
                   num_proc: int | None = None):
    """`prompt_ids`/`chosen_ids`/`rejected_ids` as DPOTrainer's collator takes them: the prompt's ids as SFT and PPO
    have them (special tokens included), each answer's ids then EOS. Over-long pairs are dropped and counted.
    Returns the tokenized pairs and the kept rows (the text, for the evaluation report)."""
    def answer_ids(prompt_text: str, answer: str) -> list[int]:  # the answer's ids then EOS, as SFT has them
        out = tokenize_segments(tokenizer, [(prompt_text, False), (answer, True)])
        return [i for i, trained in zip(out["input_ids"], out["completion_mask"]) if trained]

    def fn(batch):
        try:
            texts = [render_prompt(tokenizer, p) for p in batch["prompt"]]
            prompts = [encode(tokenizer, t) for t in texts]
            out = {"prompt_ids": prompts}
            for key in ("chosen", "rejected"):
                out[f"{key}_ids"] = [answer_ids(t, completion_text(tokenizer, p, a))
                                     for t, p, a in zip(texts, batch["prompt"], batch[key])]
        except TemplateError as e:
            raise UserError(f"--model_name_or_path/--tokenizer_name: {e}") from e
        out["keep"] = [len(p) <= script.max_prompt_length and len(p) + max(len(c), len(r)) <= max_length
                       for p, c, r in zip(prompts, out["chosen_ids"], out["rejected_ids"])]
        return out

    ds = rows.map(fn, batched=True, remove_columns=rows.column_names, desc=f"Tokenizing {name} pairs",
                  num_proc=num_proc)
    keep = [i for i, k in enumerate(ds["keep"]) if k]
    if verbose:
        print(f"{name}: {len(ds)} pairs; {len(ds) - len(keep)} longer than --max_prompt_length "
              f"{script.max_prompt_length} / --max_length {max_length} tokens dropped")
    if not keep:
        collect([f"every {name} pair is longer than --max_prompt_length {script.max_prompt_length} or --max_length "
                 f"{max_length} tokens"])
    return ds.select(keep).remove_columns("keep"), rows.select(keep)


class Trainer(AtomicCheckpoints, DPOTrainer):
    """TRL's DPOTrainer, with checkpoints written under a temporary name and renamed, and the pairs tokenized by
    this script (`tokenize_pairs`) rather than by TRL, which would tokenize prompt and answer together and could
    merge the prompt's last space into the answer."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def build_trainer(script: ScriptArguments, config: DPOConfig, model_args: ModelArguments, tokenizer, train_ds,
                  *, eval_ds=None, callbacks=()) -> Trainer:
    """The policy (and, without LoRA, the frozen reference) and `DPOTrainer` as the stage trains them."""
    set_seed(config.seed)  # the LoRA weights are initialised at random
    model = load_model(model_args, "CAUSAL_LM", config.trust_remote_code, tokenizer.pad_token_id)
    check_vocabulary(tokenizer, model, model_args.tokenizer_name or model_args.model_name_or_path,
                     model_args.model_name_or_path, "--tokenizer_name", model_flag="--model_name_or_path")
    ref_model = None
    if not model_args.use_peft:
        ref_model = load_model(model_args, "CAUSAL_LM", config.trust_remote_code, tokenizer.pad_token_id)
        ref_model.requires_grad_(False).eval()
    with trainer_validation():  # TRL's checks of its flags against the model (--sync_ref_model with LoRA)
        trainer = Trainer(model=model, ref_model=ref_model, args=config, train_dataset=train_ds,
                          eval_dataset=eval_ds, processing_class=tokenizer,
                          peft_config=lora_config(model_args, "CAUSAL_LM"), callbacks=list(callbacks))
    if script.lm_head == "plain" or (script.lm_head == "auto" and trainer.args.device.type == "cpu"):
        for m in (trainer.model, trainer.ref_model):
            if m is not None:
                plain_lm_head(m.get_base_model() if hasattr(m, "get_base_model") else m)
    return trainer


@torch.no_grad()
def implicit_rewards(trainer: Trainer, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit reward `beta * (log pi(y) - log ref(y))` of each pair's chosen and rejected answer, in the
    dataset's order, each `[len(dataset)]` float32 on CPU (every process scores a share; the shares are gathered)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in trainer.get_eval_dataloader(dataset):
        mask = batch["completion_mask"]
        labels = batch["input_ids"].masked_fill(mask == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
        logps = out.log_probs[:, -(mask.size(1) - 1):].sum(1)
        ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)
        pol_c, pol_r = logps.chunk(2)
        c, r = trainer.accelerator.gather_for_metrics((trainer.beta * (pol_c - ref_c), trainer.beta * (pol_r - ref_r)))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def main(script: ScriptArguments, config: DPOConfig, model_args: ModelArguments) -> StageResult:
    check_args(script, config)
    check_model_path(model_args.model_name_or_path or "", "--model_name_or_path",
                     base_override=model_args.base_model_name_or_path)
    stage = TrainerStage(config, script.overwrite_output_dir, script.save_on_interrupt)
    if config.per_device_eval_batch_size is None:
        config.per_device_eval_batch_size = config.per_device_train_batch_size

    # Data first: a bad row should cost seconds, not a model load.
    train_rows, train_layout = load_pairs(script.dataset_name, script.train_data_dir, script.split,
                                          script.train_subset, script.columns)
    eval_rows, eval_layout = load_pairs(script.dataset_name, script.eval_data_dir, script.split, script.eval_subset,
                                        script.columns)
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path or "",
                               config.trust_remote_code, "right")
    if stage.is_main:
        print(f"data: train {train_layout.describe(tokenizer)}; eval {eval_layout.describe(tokenizer)}")
    train_ds, _ = tokenize_pairs(train_rows, tokenizer, script, config.max_length, "train", verbose=stage.is_main,
                                 num_proc=config.dataset_num_proc)
    eval_ds, eval_rows = tokenize_pairs(eval_rows, tokenizer, script, config.max_length, "eval", verbose=stage.is_main,
                                        num_proc=config.dataset_num_proc)

    time_limit = TimeLimit(script.max_train_seconds) if script.max_train_seconds else None
    trainer = build_trainer(script, config, model_args, tokenizer, train_ds, eval_ds=eval_ds,
                            callbacks=stage.callbacks + ([time_limit] if time_limit else []))
    stage.begin(script, model_args, config, trainer=trainer, tokenizer=tokenizer, stage="DPO")
    if script.eval_first_step and not stage.resume:
        trainer.evaluate()
    stage.train(trainer)
    if not any(h.get("step") == trainer.state.global_step and "eval_loss" in h for h in trainer.state.log_history):
        trainer.evaluate()  # the final eval metrics, if the last step was not an eval step

    tmp = stage.save_model(trainer)
    r_j, r_k = implicit_rewards(trainer, eval_ds)
    trainer.accelerator.wait_for_everyone()
    if not stage.is_main:
        return StageResult(config.output_dir, {})
    kinds = eval_rows["pair_kind"] if "pair_kind" in eval_rows.column_names else None
    report = pair_report(eval_rows["question"], [answer_display(a) for a in eval_rows["chosen"]],
                         [answer_display(a) for a in eval_rows["rejected"]], r_j, r_k, kinds=kinds)
    report["what"] = f"DPO's implicit reward beta * (log pi - log ref), beta {config.beta}"
    write_report(tmp, report, title="DPO implicit reward evaluation")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {"steps": trainer.state.global_step, "beta": config.beta, "loss_type": ",".join(config.loss_type),
               "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
               **({"stopped_by_time_limit_at_step": time_limit.stopped_at} if time_limit else {}),
               "eval_pairs": report["n_pairs"], "eval_accuracy": report["accuracy"],
               "eval_mean_margin": report["mean_margin"],
               **({"eval_accuracy_lookalike": report["accuracy_lookalike"]} if kinds else {})}
    stage.commit(tmp, tokenizer, {
        "stage": "DPO " + ("LoRA adapter" if model_args.use_peft else "model (full fine-tuning)"),
        "base_model": model_args.model_name_or_path,
        "dataset": f"{script.dataset_name} ({script.train_data_dir} / {script.eval_data_dir}, {script.split})",
        "metrics": metrics,
        "notes": "\nThe implicit reward's accuracy on the evaluation pairs: `eval_report.md`.\n",
    })
    lookalike = (f" (look-alike pairs {report['accuracy_lookalike']:.4f} on {report['n_lookalike']})"
                 if report.get("accuracy_lookalike") is not None else "")
    print(f"implicit reward accuracy {report['accuracy']:.4f} on {report['n_pairs']} eval pairs{lookalike}; "
          f"saved to {config.output_dir}")
    return StageResult(config.output_dir, metrics)


def parse(argv: list[str] | None = None, kwargs: dict | None = None
          ) -> tuple[ScriptArguments, DPOConfig, ModelArguments]:
    return parse_args((ScriptArguments, DPOConfig, ModelArguments), ALIASES, {**DEFAULTS, **device_defaults()},
                      argv, __doc__, kwargs=kwargs)


def run_dpo(**kwargs) -> StageResult:
    """Stage 3 by DPO from Python: the keyword arguments are the flags without their dashes, with the same defaults
    and checks (StackLLaMA-2's names too; ``config="run.yaml"`` reads a YAML of them)::

        from training_dpo import run_dpo
        dpo = run_dpo(model_name_or_path="runs/sft", dataset_name=".", max_steps=100, output_dir="runs/dpo")
        dpo.metrics["eval_accuracy"]

    Returns the output folder and the model card's metrics; a mistake raises ``common.cli.UserError``."""
    return call_stage("training_dpo.run_dpo", parse, main, kwargs)


if __name__ == "__main__":
    run(lambda: main(*parse()))
