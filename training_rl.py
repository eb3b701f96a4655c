r"""Stage 3: PPO, RLOO or GRPO against a reward model, on accelerate (common/ppo.py; docs/ppo.md, docs/critic_free.md).

    # offline demo, after training_sft.py and training_reward_model.py
    python training_rl.py --model_name runs/sft --reward_model_name runs/rm --dataset_name . --subset data/rl \
        --steps 640 --batch_size 16 --mini_batch_size 4 --gradient_accumulation_steps 1 --output_max_length 32 \
        --output_dir runs/ppo

    # StackLLaMA's command runs unchanged
    accelerate launch --multi_gpu --num_machines 1 --num_processes 8 training_rl.py --log_with=wandb \
        --model_name=<SFT_MODEL> --reward_model_name=<RM_MODEL> --adafactor=False --tokenizer_name=<TOKENIZER> \
        --save_freq=100 --output_max_length=128 --batch_size=8 --gradient_accumulation_steps=8 \
        --batched_gen=True --ppo_epochs=4 --seed=0 --learning_rate=1.4e-5 --early_stopping=True \
        --output_dir=llama-se-rl-finetune

    # from Python (a notebook): the flags as keyword arguments; returns the folder and the final metrics
    from training_rl import run_rl
    ppo = run_rl(model_name="runs/sft", reward_model_name="runs/rm", dataset_name=".", output_dir="runs/ppo")

The policy starts from `--model_name` (a model, or an SFT adapter merged in memory) with a new LoRA adapter;
the reference is the same network with the adapter disabled. The reward model (any one-label sequence
classifier: Hub id, folder or adapter folder) scores `Question: …\n\nAnswer: {response}` with its own tokenizer.
`--steps` counts episodes (responses) per process, as TRL's PPOConfig did for StackLLaMA: the run makes
ceil(steps / batch_size) PPO steps, each of batch_size responses on every process.

`--algorithm rloo|grpo` keeps every other flag and output, drops the value head, and answers each of
batch_size / --num_generations prompts --num_generations times: RLOO's advantage is an answer's reward (score minus
its KL to the reference) minus the mean of its group's other answers'; GRPO's is its score minus the group's mean,
divided by the group's std (`--scale_rewards none --loss_type dr_grpo`: Dr. GRPO), with the KL in the loss.

    python training_rl.py --algorithm grpo --num_generations 4 ...   # the same flags as above otherwise
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

import common.quiet  # noqa: F401  (first: silences known library messages)

import torch
from tqdm.auto import tqdm  # a widget in Jupyter, a text bar in a terminal

from common import interrupt
from common.checkpoints import check_origin, origin
from common.cli import StageResult, UserError, call_stage, collect, parse_args, run
from common.fields import data_dir_field, dataset_name_field, overwrite_output_dir_field, split_field
from common.flag_checks import accelerate_tracker_problems, scheduler_problem
from common.gold import gold_score
from common.interrupt import save_on_interrupt_field
from common.layouts import columns_field, load_normalized
from common.modeling import (
    ModelArguments,
    check_model_path,
    check_vocabulary,
    load_model,
    load_tokenizer,
    lora_config,
)
from common.outputs import (
    MetricsWriter,
    check_processes,
    clear_checkpoints,
    commit_final,
    final_tmp_dir,
    prepare_output_dir,
    read_metrics,
    resume_line,
    write_model_card,
    write_run_args,
    writing,
)
from common.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer, check_algorithm
from common.ppo_distributed import is_zero3, whole_models_under_zero3
from common.prompts import encode, render_prompt


@dataclass
class ScriptArguments:
    """Where the prompts and the reward model come from, where the run goes, and how it reports."""

    reward_model_name: str | None = field(
        default=None, metadata={"help": "Reward model: Hub id, folder, or SEQ_CLS adapter folder."})
    reward_tokenizer_name: str | None = field(
        default=None, metadata={"help": "Reward model's tokenizer (default: its own)."})
    dataset_name: str = dataset_name_field(reads="The prompts")
    subset: str = data_dir_field("data/rl", "the prompts")
    split: str = split_field("the prompts")
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompts longer than this (in policy tokens) are dropped."})
    output_dir: str = field(default="runs/", metadata={"help": "Output folder."})
    save_freq: int | None = field(
        default=None, metadata={"help": "Checkpoint every N PPO steps (None: only the final model)."})
    report_to: str = field(default="none", metadata={"help": "Trackers: none, tensorboard, wandb (comma-separated)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint-N folder, or latest."})
    overwrite_output_dir: bool = overwrite_output_dir_field()
    columns: list[str] | None = columns_field()
    save_on_interrupt: bool = save_on_interrupt_field()
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Default: on with a GPU, off on CPU."})
    eval_freq: int | None = field(
        default=None, metadata={"help": "Every N PPO steps (and before the first, and after the last), answer "
                                        "--eval_prompts held-out questions and log their reward-model score, gold "
                                        "score (sample-data questions) and length as eval/* in metrics.jsonl "
                                        "(None: no evaluation)."})
    eval_data_dir: str = data_dir_field("data/evaluation", "the held-out questions of --eval_freq")
    eval_prompts: int = field(default=64, metadata={"help": "Held-out questions per evaluation (the first N)."})
    max_skipped_steps: int = field(default=3, metadata={"help": "Stop after this many consecutive non-finite steps."})
    samples_per_step: int = field(
        default=3, metadata={"help": "Prompt/response/score triples per step in samples.jsonl."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})


# Other scripts' names for what PPO counts differently (an unknown flag's error names the one to use).
HINTS = {"--eval_subset": "the held-out questions' folder is --eval_data_dir (--eval_prompts: how many)",
         "--max_steps": "PPO counts episodes: use --steps N (N / --batch_size PPO steps), as StackLLaMA did",
         "--num_train_epochs": "PPO counts episodes: use --steps N (N / --batch_size PPO steps), as StackLLaMA did"}
ALIASES = {"--model_name": "model_name_or_path", "--log_with": "report_to",
           "--reward_model_name_or_path": "reward_model_name"}


def check_args(script: ScriptArguments, config: PPOConfig, model_args: ModelArguments) -> None:
    problems = config.problems()
    for name in ("max_prompt_length", "max_skipped_steps", "eval_prompts"):
        if getattr(script, name) <= 0:
            problems.append(f"--{name} must be > 0, got {getattr(script, name)}")
    if not script.reward_model_name:
        problems.append("--reward_model_name is required")
    if not model_args.model_name_or_path:
        problems.append("--model_name/--model_name_or_path is required")
    if not model_args.use_peft and (model_args.load_in_4bit or model_args.load_in_8bit):
        problems.append("full fine-tuning (--use_peft false) of a 4/8-bit model is not possible: "
                        "drop --load_in_4bit/--load_in_8bit")
    if script.save_freq is not None and script.save_freq <= 0:
        problems.append(f"--save_freq must be > 0, got {script.save_freq}")
    if script.eval_freq is not None and script.eval_freq <= 0:
        problems.append(f"--eval_freq must be > 0 (or None: no evaluation), got {script.eval_freq}")
    if config.reward_normalization == "stats" and script.reward_model_name and \
            not os.path.isfile(os.path.join(script.reward_model_name, "reward_stats.json")):
        stats_file = os.path.join(script.reward_model_name, "reward_stats.json")
        problems.append(f"--reward_normalization stats needs {stats_file} (written by training_reward_model.py): "
                        "use running or none")
    if problem := scheduler_problem(config.lr_scheduler_type, None, kwargs_flag=None):  # built after the models
        problems.append(problem)
    collect(problems)


def load_prompts(script: ScriptArguments, tokenizer, subset: str | None = None):
    """Validated, tokenized prompts (of --subset, or ``subset``) in any prompt layout (common/layouts.py); those over
    --max_prompt_length are dropped and counted. Each keeps its ``prompt`` (the reward model's text is rendered from
    it) and ``question`` (readable); an ``answer_key`` column (the sample data's) is kept for the gold judge."""
    loaded, layout = load_normalized("prompts", script.dataset_name, script.subset if subset is None else subset,
                                     script.split, script.columns)
    # The prefix SFT trained on, byte for byte (common.prompts.tokenize_segments's first piece).
    def tokenize(rows):
        return {"input_ids": [encode(tokenizer, render_prompt(tokenizer, p)) for p in rows["prompt"]]}

    ds = loaded.dataset.map(tokenize, batched=True, remove_columns=[
        c for c in loaded.dataset.column_names if c not in ("prompt", "question", "answer_key")])
    kept = ds.filter(lambda row: len(row["input_ids"]) <= script.max_prompt_length)
    if len(kept) == 0:
        raise UserError(f"every prompt of {loaded.source} is longer than --max_prompt_length "
                        f"{script.max_prompt_length}: nothing to train on")
    return kept, len(ds) - len(kept), f"{loaded.source}, {layout.describe(tokenizer)}"


def main(script: ScriptArguments, config: PPOConfig, model_args: ModelArguments) -> StageResult:
    from accelerate.utils import set_seed

    check_args(script, config, model_args)
    check_model_path(model_args.model_name_or_path, "--model_name", base_override=model_args.base_model_name_or_path)
    check_model_path(script.reward_model_name, "--reward_model_name")
    resume = prepare_output_dir(script.output_dir, script.overwrite_output_dir, script.resume_from_checkpoint)
    trackers = [t for t in script.report_to.split(",") if t and t != "none"]
    accelerator = make_accelerator(script, trackers)
    if resume:  # before any model loads
        check_processes(resume, accelerator.num_processes)
        check_algorithm(resume, config)
    is_main = accelerator.is_main_process
    set_seed(config.seed)

    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path, script.trust_remote_code,
                               "left")
    prompts = training_prompts(script, config, tokenizer, accelerator)
    eval_rows = held_out_rows(script, tokenizer, accelerator.num_processes) if script.eval_freq else []
    reward_stats = None
    if config.reward_normalization == "stats":
        with open(os.path.join(script.reward_model_name, "reward_stats.json"), encoding="utf-8") as f:
            reward_stats = json.load(f)
    trainer = build_trainer(script, config, model_args, accelerator, tokenizer, prompts=prompts,
                            reward_stats=reward_stats)
    total_steps = total_ppo_steps(config)

    writer = MetricsWriter(script.output_dir, enabled=is_main)
    samples_path = os.path.join(script.output_dir, "samples.jsonl")
    policy = accelerator.unwrap_model(trainer.model).lm()
    trainer.origin = origin(model_args.model_name_or_path, policy, tokenizer, config.algorithm.upper())
    if resume:  # another model stops here, before any step
        note = check_origin(resume, trainer.origin)
        if is_main:
            print(resume_line(resume, total_steps, bool(script.resume_from_checkpoint), note), flush=True)
        trainer.load_checkpoint(resume)
    step = trainer.progress.step
    if is_main:
        if script.overwrite_output_dir and not resume and (removed := clear_checkpoints(script.output_dir)):
            print(f"--overwrite_output_dir: removed {removed} checkpoint folder(s) of the earlier run", flush=True)
        final_tmp_dir(script.output_dir, clear=True)
        write_run_args(script.output_dir, script, config, model_args,
                       extra={"total_ppo_steps": total_steps, "num_processes": accelerator.num_processes})
        writer.truncate_after(step) if resume else writer.reset()
        _truncate_samples(samples_path, step)
    if trackers:
        accelerator.init_trackers("rlhf-ppo", config={k: v for k, v in {**vars(script), **vars(config)}.items()
                                                      if isinstance(v, (int, float, str, bool))})

    train_steps(script, trainer, total_steps, eval_rows, resume, writer=writer, samples_path=samples_path,
                trackers=trackers)
    card_metrics = save_final(script, model_args, trainer, tokenizer)
    # Last, once every process is here: drop the DDP wrapper first (its reducer holds the process group; freed after
    # the group is destroyed, gloo's destructor can deadlock), then end the trackers and the process group.
    accelerator.wait_for_everyone()
    del trainer
    accelerator.free_memory()
    accelerator.end_training()
    return StageResult(script.output_dir, card_metrics)


def training_prompts(script: ScriptArguments, config: PPOConfig, tokenizer, accelerator) -> list:
    """The prompts of --subset (``load_prompts``), at least one global batch of them."""
    prompts, dropped, source = load_prompts(script, tokenizer)
    if len(prompts) < config.prompts_per_step * accelerator.num_processes:
        per_prompt = f" / --num_generations {config.group_size}" if config.group_size > 1 else ""
        raise UserError(f"{len(prompts)} usable prompts in {source} are fewer than one batch "
                        f"(--batch_size {config.batch_size}{per_prompt} x {accelerator.num_processes} processes)")
    if accelerator.is_main_process:
        print(f"prompts: {len(prompts)} from {source}; {dropped} longer than --max_prompt_length "
              f"{script.max_prompt_length} dropped")
    return prompts


def held_out_rows(script: ScriptArguments, tokenizer, num_processes: int) -> list[dict]:
    """The first --eval_prompts questions of --eval_data_dir, as many on every process."""
    held_out, _, _ = load_prompts(script, tokenizer, script.eval_data_dir)
    usable = min(script.eval_prompts, len(held_out)) // num_processes * num_processes
    eval_rows = [held_out[i] for i in range(usable)]  # the same number on every process
    if not eval_rows:
        raise UserError(f"--eval_data_dir {script.eval_data_dir}: fewer usable questions than processes")
    return eval_rows


def held_out_gold(rows: list[dict], answers: list[str]) -> list[float | None]:
    """The judge of the held-out evaluation during training (``PPOTrainer.evaluate``): the sample data's gold score
    (common/gold.py) of each answer to its row's question, None where the row has no ``answer_key``."""
    return [gold_score(row["question"], answer, row["answer_key"]) if row.get("answer_key") else None
            for row, answer in zip(rows, answers)]


def train_steps(script: ScriptArguments, trainer: PPOTrainer, total_steps: int, eval_rows: list[dict],
                resume: str | None, *, writer: MetricsWriter, samples_path: str, trackers: list[str]) -> None:
    """PPO steps up to ``total_steps``: each step's metrics to metrics.jsonl (and the trackers) with, every
    --eval_freq steps, the held-out evaluation (judged by ``held_out_gold``), its first samples to samples.jsonl, a
    checkpoint every --save_freq steps or on a signal with --save_on_interrupt; too many skipped steps in a row stop
    the run."""
    accelerator, config = trainer.accelerator, trainer.config
    is_main, step = accelerator.is_main_process, trainer.progress.step
    eval_seed = config.seed + 7919  # every evaluation samples from the same seed: differences are the policy's
    if eval_rows and not resume:
        held_out = trainer.evaluate(eval_rows, eval_seed, judge=held_out_gold)  # where the policy starts
        if is_main:
            writer.write({"step": 0, "episodes": 0, **held_out})
    bar = tqdm(total=total_steps, initial=step, disable=not is_main or script.disable_tqdm,
               desc=config.algorithm.upper())
    interrupt.start(script.output_dir, total_steps, script.save_on_interrupt, step)
    while trainer.progress.step < total_steps:
        metrics, samples = trainer.step()
        interrupt.progress.step = trainer.progress.step
        if eval_rows and (trainer.progress.step % script.eval_freq == 0 or trainer.progress.step == total_steps):
            metrics.update(trainer.evaluate(eval_rows, eval_seed, judge=held_out_gold))
        if is_main:
            writer.write(metrics)
            with open(samples_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(s) + "\n" for s in samples[: script.samples_per_step])
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.2f}")
        if trackers:
            accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=trainer.progress.step)
        if trainer.progress.consecutive_skips >= script.max_skipped_steps:
            for tracker in accelerator.trackers:  # the run ends here, its tracker runs too (a notebook lives on)
                tracker.finish()
            raise UserError(f"stopping: {trainer.progress.consecutive_skips} consecutive PPO steps had non-finite "
                            f"scores or losses (skipped, the weights are untouched); the last checkpoint in "
                            f"{script.output_dir} is intact")
        stopping = script.save_on_interrupt and interrupt.requested(accelerator.device)
        if stopping or script.save_freq and trainer.progress.step % script.save_freq == 0:
            trainer.save_checkpoint(os.path.join(script.output_dir, f"checkpoint-{trainer.progress.step}"))
        if stopping:
            interrupt.stop()
    bar.close()


def save_final(script: ScriptArguments, model_args: ModelArguments, trainer: PPOTrainer, tokenizer) -> dict:
    """The final model and its card in --output_dir; returns the card's metrics (empty on other processes)."""
    accelerator, config = trainer.accelerator, trainer.config
    tmp = final_tmp_dir(script.output_dir)
    accelerator.wait_for_everyone()
    with writing(f"the final model to {tmp}"):
        trainer.save_model(tmp)  # every process takes part (ZeRO-3 gathers); the main one writes
    if not accelerator.is_main_process:
        return {}
    with writing(f"the final model to {script.output_dir}"):
        tokenizer.save_pretrained(tmp)
        commit_final(tmp, script.output_dir)
    card_metrics = model_card_metrics(read_metrics(script.output_dir), trainer.progress)
    kind = "LoRA adapter + value head" if model_args.use_peft else "model + value head"
    write_model_card(script.output_dir, f"{config.algorithm.upper()} policy " + kind, model_args.model_name_or_path,
                     f"{script.dataset_name} ({script.subset}, {script.split}); reward model "
                     f"{script.reward_model_name}", card_metrics)
    print(f"saved to {script.output_dir}")
    return card_metrics


def model_card_metrics(records: list[dict], progress) -> dict:
    """The model card's figures from metrics.jsonl's ``records`` and the run's counters (``progress``)."""
    history = [m for m in records if "objective/scores" in m]
    held_out = [m for m in records if "eval/rm_score" in m]  # step 0 (where the policy started) to the last
    fifth = max(1, len(history) // 5)
    # None where metrics.jsonl holds no step: a run resumed from another folder's checkpoint of its last step
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows) if rows else None  # noqa: E731
    last = history[-1] if history else {}
    card_metrics = {"ppo_steps": progress.step, "episodes": progress.episodes,
                    "score_first_fifth": mean(history[:fifth], "objective/scores"),
                    "score_last_fifth": mean(history[-fifth:], "objective/scores"),
                    "kl_last": last.get("objective/kl"), "kl_coef_last": last.get("objective/kl_coef"),
                    "skipped_steps": progress.skipped_steps}
    for key in ("rm_score", "gold") if held_out else ():
        card_metrics[f"eval_{key}_first"] = held_out[0][f"eval/{key}"]
        card_metrics[f"eval_{key}_last"] = held_out[-1][f"eval/{key}"]
    return card_metrics


def _truncate_samples(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def make_accelerator(script: ScriptArguments, trackers: list[str] | None = None):
    from accelerate import Accelerator

    collect(accelerate_tracker_problems(trackers))  # before any model loads

    # cpu=True when there is no GPU: accelerate only forms a gloo process group under torchrun if told so. Not under
    # DeepSpeed, which has its own CPU back end (gloo) and which accelerate turns off when told cpu=True.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if deepspeed and not torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # Launched under DeepSpeed without a GPU, accelerate (1.15, PartialState) finds no process-group backend for
        # the device, lets DeepSpeed form the group (gloo) and then, its backend being None, counts one process:
        # num_processes 1 and process_index 0 on every rank, so DeepSpeed's batch check fails with several processes.
        # Naming the backend of DeepSpeed's CPU accelerator (gloo; ccl where oneCCL is installed) makes accelerate
        # hand it to DeepSpeed's init_distributed and count the real world size and rank.
        from accelerate.utils import InitProcessGroupKwargs
        from deepspeed.accelerator import get_accelerator

        handlers.append(InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name()))
    return Accelerator(log_with=trackers or None, project_dir=script.output_dir, kwargs_handlers=handlers,
                       cpu=not torch.cuda.is_available() and not deepspeed)


def total_ppo_steps(config: PPOConfig) -> int:
    return math.ceil(config.steps / config.batch_size)  # as TRL's PPOConfig counted: per process


def build_trainer(script: ScriptArguments, config: PPOConfig, model_args: ModelArguments, accelerator, tokenizer,
                  *, prompts: list[dict], reward_stats: dict | None = None) -> PPOTrainer:
    """The reward model, the policy with its value head (and a reference copy with full fine-tuning), the optimizer
    and the `PPOTrainer` as the stage trains them (benchmarks/run.py times this same object)."""
    from transformers import get_scheduler

    reward_tokenizer = load_tokenizer(script.reward_tokenizer_name or script.reward_model_name,
                                      script.trust_remote_code, "right")
    rm_args = ModelArguments(model_name_or_path=script.reward_model_name, dtype=model_args.dtype, use_peft=False)
    with whole_models_under_zero3(accelerator):  # inference only, never prepared: a full copy on every process
        reward_model = load_model(rm_args, "SEQ_CLS", script.trust_remote_code, reward_tokenizer.pad_token_id,
                                  flag="--reward_model_name", require_score_head=True)
    check_vocabulary(reward_tokenizer, reward_model, script.reward_tokenizer_name or script.reward_model_name,
                     script.reward_model_name, "--reward_tokenizer_name", model_flag="--reward_model_name")
    reward_model.eval().requires_grad_(False).to(accelerator.device)

    policy = load_model(model_args, "CAUSAL_LM", script.trust_remote_code, tokenizer.pad_token_id, flag="--model_name")
    check_vocabulary(tokenizer, policy, model_args.tokenizer_name or model_args.model_name_or_path,
                     model_args.model_name_or_path, "--tokenizer_name", model_flag="--model_name")
    ref_model = None
    if model_args.use_peft:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(model_args, "CAUSAL_LM"))
    elif is_zero3(accelerator):  # the policy was built partitioned: a copy of it would hold no weights
        with whole_models_under_zero3(accelerator):
            ref_model = load_model(model_args, "CAUSAL_LM", script.trust_remote_code, tokenizer.pad_token_id,
                                   flag="--model_name")
    else:
        ref_model = copy.deepcopy(policy)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False).to(accelerator.device)
    disable_dropout(policy)
    if script.gradient_checkpointing if script.gradient_checkpointing is not None else torch.cuda.is_available():
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PolicyWithValueHead(policy)
    if config.algorithm != "ppo":  # RLOO and GRPO have no critic: the value head is not trained
        model.value_head.requires_grad_(False)

    optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=0,
                              num_training_steps=total_ppo_steps(config))
    return PPOTrainer(accelerator, model, tokenizer, reward_model=reward_model, reward_tokenizer=reward_tokenizer,
                      prompts=prompts, config=config, reward_stats=reward_stats, ref_model=ref_model,
                      optimizer=optimizer, scheduler=scheduler)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of the model off: with dropout the log-probs at sampling time, the old log-probs and the training
    log-probs of the same tokens disagree (Huang et al. 2024, sec. 4). Dropout modules get p = 0 (some models read
    `.p`, GPT-2's attention among them); dropout kept as a probability on a module (`attention_dropout`, OPT's
    `dropout` and `activation_dropout`, passed to `nn.functional.dropout`) and OPT's `layerdrop` are set to 0; LoRA's
    dropouts become identities, what peft builds for lora_dropout 0 (no call per layer)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "activation_dropout", "layerdrop"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
        lora_dropout = getattr(module, "lora_dropout", None)
        if isinstance(lora_dropout, torch.nn.ModuleDict):
            for name in list(lora_dropout.keys()):
                lora_dropout[name] = torch.nn.Identity()


def build_optimizer(config: PPOConfig, params: list) -> torch.optim.Optimizer:
    """Adafactor if asked; else AdamW without weight decay (Adam, as TRL's PPO used), in torch's fused kernel where
    it has one (CPU and CUDA; what `Trainer` picks for SFT and the reward model too: adamw_torch_fused)."""
    if config.adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    try:
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)


def parse(argv: list[str] | None = None, kwargs: dict | None = None
          ) -> tuple[ScriptArguments, PPOConfig, ModelArguments]:
    return parse_args((ScriptArguments, PPOConfig, ModelArguments), ALIASES, None, argv, __doc__, kwargs=kwargs,
                      hints=HINTS)


def run_rl(**kwargs) -> StageResult:
    """Stage 3 (PPO, or ``algorithm="rloo"``/``"grpo"``) from Python: the keyword arguments are the flags without
    their dashes, with the same defaults and checks (StackLLaMA's names too; ``config="run.yaml"`` reads a YAML)::

        from training_rl import run_rl
        ppo = run_rl(model_name="runs/sft_merged", reward_model_name="runs/rm_merged", dataset_name=".",
                     steps=320, output_dir="runs/ppo")
        ppo.metrics["score_last_fifth"]

    Returns the output folder and the model card's metrics (the per-step ones are in ``metrics.jsonl`` there); a
    mistake raises ``common.cli.UserError``."""
    return call_stage("training_rl.run_rl", parse, main, kwargs)


if __name__ == "__main__":
    run(lambda: main(*parse()))
