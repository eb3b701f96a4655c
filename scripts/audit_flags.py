r"""Audit every flag of every script: does it work on the sample data, or is it refused with one line?

    python scripts/audit_flags.py                          # every script, every flag; writes docs/flags.md
    python scripts/audit_flags.py --scripts training_sft --flags optim report_to --jobs 2
    python scripts/audit_flags.py --parse_only             # parse + validation only (seconds; what the tests run)

For each script the flags are the parser's actions (``common.cli.build_parser`` on the dataclasses, aliases and
defaults the script's ``parse`` passes to ``parse_args``), so a flag a library upgrade adds is audited without any
change here. Each flag gets one or more values that differ from the base command's (``values``): a boolean the
opposite of its default, every non-default choice of a choice flag, every tracker name for ``--report_to``, a small
valid number, a sample-data path or a temporary file for a path, a few words for free text; ``VALUES`` holds the
values that must be picked by hand (bad ones included, to see them refused), ``EXTRA_VALUES`` values tried besides the
generic ones, ``WITH`` the flags a value needs to mean anything (``--hub_token`` with ``--push_to_hub``), ``PREPARE``
what the output folder must hold first (a model for ``--overwrite_output_dir`` to replace).

Each (flag, value) runs in a child process forked from this one (the libraries are imported once; a child's global
state -- accelerate's singletons, torch's determinism or compile settings, environment variables -- dies with it):
the script's ``parse`` and ``main`` on a tiny random Llama and 24 rows of each sample-data split, one optimizer step
(PPO: one step of 2 episodes; evaluate: 2 prompts), with checkpoints and evaluation at that step. Outcomes:

- ``works``: the run finished, and the field is read after parsing (by the script, TRL, transformers, ...);
- ``refused``: a ``UserError`` (``DataError`` included) of one line that names the flag;
- ``broken``: any other exception, a hang (``--timeout``), a multi-line error, an error that does not name the flag,
  or a run that finished although nothing read the field after parsing (the flag is silently ignored) and
  neither ``INERT`` gives the reason it has no effect here (``--ddp_*`` on one process) nor ``APPLIED_WHILE_PARSING``
  says how parsing itself applies it (``--bf16`` sets the mixed precision).

A library upgrade shows up as new ``broken`` rows: a new flag nothing reads, a new value that fails mid-run. The check
belongs in common/flag_checks.py (or the script's ``check_args``); a reviewed reason in ``INERT``.
Reads cannot tell a flag applied too late (TRL sets ``--eos_token`` on the tokenizer after the scripts tokenized the
data) or dropped by a library after it read it (accelerate trains ``--fp16`` on CPU in float32): those were found by
reading the code, and are refused or applied where the script prepares its data.

Timing: about 1000 runs in 5-10 minutes with ``--jobs 2`` on two shared CPU cores (a run costs about half a second:
the data sets' fingerprints are random, ``_fast_runs``); ``--parse_only`` takes seconds.

Reads are traced by giving each parsed dataclass a subclass whose ``__getattribute__`` records who reads a field;
reads that only serialize the arguments (``to_dict``, ``run_args.yaml``, ``repr``) do not count. With
``--parse_only`` each value goes through the script's ``parse`` and its argument checks only, in this process.
The markdown table (``--output``, default docs/flags.md) holds the counts per script and every flag that is refused,
broken, inert or was only parsed, with the reason; ``--json`` writes every outcome.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_TELEMETRY": "1"}  # set by main: a run must never wait on the network

SCRIPTS = ["training_sft", "training_reward_model", "training_dpo", "training_rl", "merge_with_lora", "evaluate"]
TRACKERS = ["azure_ml", "comet_ml", "mlflow", "neptune", "tensorboard", "trackio", "wandb", "codecarbon", "clearml",
            "dagshub", "flyte", "dvclive", "swanlab", "kubeflow", "all"]  # transformers' INTEGRATION_TO_CALLBACK, all

# Values chosen by hand, by field name (all scripts) or "script:field". A value is one command-line word, or a list
# of words; "{fixture}" is replaced by that fixture's path (``Fixtures``); "{out}" by the case's output folder.
VALUES: dict[str, list] = {
    "config": ["{yaml}"],
    "merge_with_lora:config": ["{yaml_merge}"],
    "report_to": [*TRACKERS, "no_such_tracker"],
    "training_rl:report_to": ["tensorboard", "wandb", "all", "tensorboard,wandb"],
    "dataset_name": ["{data}", "{data_file}"],
    "subset": ["finetune"],
    "training_rl:subset": ["evaluation"],
    "evaluate:subset": ["rl"],
    "split": ["train[:20]"],
    "train_data_dir": ["evaluation"],
    "eval_data_dir": ["reward"],
    "training_rl:eval_data_dir": ["rl"],
    "training_dpo:loss_type": ["hinge", "ipo", "exo_pair", ["exo_pair", "--label_smoothing", "0.001"], "nca_pair",
                               "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
                               "discopop", "sft", "sigmoid_norm", ["sigmoid", "sft", "--loss_weights", "1.0", "0.5"],
                               "no_such_loss"],
    "f_divergence_type": ["forward_kl", "js_divergence", "alpha_divergence", "no_such_divergence"],
    "training_sft:columns": [["question=question", "response_j=response_j"]],
    "columns": [["question=question"]],
    "output_dir": ["{out}/other"],
    "merge_with_lora:output_name": ["{out}/other"],
    "resume_from_checkpoint": ["{own_checkpoint}", "{other_checkpoint}", "latest"],
    "training_rl:resume_from_checkpoint": ["{own_checkpoint}", "latest"],
    "model_name_or_path": ["{sft}"],
    "base_model_name_or_path": ["{model}"],
    "training_rl:base_model_name_or_path": ["{model}"],
    "tokenizer_name": ["{model}"],
    "reward_tokenizer_name": ["{model}"],
    "reward_model_name": ["{rm}"],
    "adapter_model_name": ["{sft}"],
    "base_model_name": ["{model}"],
    "models": [["a={model}", "b={sft}", "c={model}"]],
    "baseline": ["b"],
    "reference": ["b"],
    "best_of_n_model": ["b"],
    "model_revision": ["main", "v2"],
    "attn_implementation": ["eager", "sdpa", "flex_attention", "flash_attention_2"],
    "lora_target_modules": [["q_proj", "v_proj"]],
    "lora_modules_to_save": [["lm_head"]],
    "lora_target_parameters": [["mlp.up_proj.weight"]],
    "lora_task_type": ["CAUSAL_LM", "SEQ_CLS"],
    "bnb_4bit_quant_storage": ["uint8"],
    "deepspeed": ["{deepspeed}", "{out}/missing.json"],
    "fsdp": ["full_shard"],
    "fsdp_config": ['{"min_num_params": 0}'],
    "accelerator_config": ['{"split_batches": true}'],
    "parallelism_config": ["{}"],
    "debug": ["underflow_overflow"],
    "lr_scheduler_kwargs": ['{"num_cycles": 1}'],
    "optim_args": ["betas=(0.9,0.99)"],
    "optim_target_modules": ["q_proj"],
    "activation_checkpointing_kwargs": ['{"use_reentrant": false}'],
    "liger_kernel_config": ['{"rope": true}'],
    "model_init_kwargs": ['{"low_cpu_mem_usage": true}'],
    "dataset_kwargs": ['{"skip_prepare_dataset": true}'],
    "chat_template_path": ["{chat_template}", "{model}"],
    "dataset_text_field": ["question"],
    "eos_token": ["<unk>", "<no_such_token>"],
    "pad_token": ["<unk>"],
    "eos_token_id": ["0", "99999"],
    "pad_to_multiple_of": ["8"],
    "hub_model_id": ["audit/model"],
    "hub_token": ["hf_audit"],
    "hub_revision": ["audit"],
    "run_name": ["audit"],
    "project": ["audit"],
    "trackio_space_id": ["audit/space"],
    "trackio_bucket_id": ["audit/bucket"],
    "trackio_static_space_id": ["audit/static"],
    "metric_for_best_model": ["loss"],
    "length_column_name": ["audit_length"],
    "label_names": [["labels"]],
    "include_for_metrics": [["inputs"]],
    "include_num_input_tokens_seen": ["all", "non_padding"],
    "torch_compile_backend": ["eager"],
    "torch_compile_mode": ["default"],
    "torch_empty_cache_steps": ["1"],
    "local_rank": ["0"],
    "ddp_timeout": ["60"],
    "dataloader_num_workers": ["1"],
    "dataloader_prefetch_factor": ["2"],
    "neftune_noise_alpha": ["5"],
    "router_aux_loss_coef": ["0.01"],
    "label_smoothing_factor": ["0.1"],
    "eval_delay": ["1"],
    "logging_steps": ["2"],
    "max_grad_norm": ["0.5"],
    "training_rl:max_grad_norm": ["0.5", "None"],
    "num_train_epochs": ["2"],
    "training_rl:lr_scheduler_type": ["linear", "cosine", "no_such_scheduler"],
    "training_rl:scale_rewards": ["group"],
    "training_rl:loss_type": ["grpo"],
    "training_dpo:loss_weights": [["1.0", "0.5"]],
    "training_rl:num_generations": ["2"],
    "cliprange_value": ["0.5", "None"],
    "reward_clip": ["1.0"],
    "missing_eos_penalty": ["1.0"],
    "reward_baseline": ["0.5"],
    "eval_freq": ["1"],
    "save_freq": ["1"],
    "max_prompt_length": ["200"],
    "training_dpo:max_prompt_length": ["300"],
    "tolerance": ["0.5"],
    "seed": ["1"],
    "data_seed": ["1"],
    "temperature": ["0.7"],
    "ref_model_init_kwargs": ['{"low_cpu_mem_usage": true}'],
}

# Values tried besides the generic ones (a list: the value, then the flags it needs).
EXTRA_VALUES: dict[str, list] = {
    "lr_scheduler_type": [["cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'],
                          ["warmup_stable_decay", "--lr_scheduler_kwargs", '{"num_decay_steps": 1}']],
    "training_rl:lr_scheduler_type": [],
    "save_strategy": [["best", "--metric_for_best_model", "eval_loss"]],
    "training_sft:padding_free": [["true", "--packing", "false"]],
}

# Values that need another flag to mean anything: "script:field=value" (or "field=value") -> extra words.
WITH: dict[str, list[str]] = {
    "training_rl:algorithm": ["--num_generations", "2"],
    "training_rl:scale_rewards": ["--algorithm", "grpo", "--num_generations", "2"],
    "training_rl:loss_type": ["--algorithm", "grpo", "--num_generations", "2"],
    "training_rl:target_kl": ["--early_stopping"],
    "restore_callback_states_from_checkpoint": ["--resume_from_checkpoint", "{own_checkpoint}"],
    "ignore_data_skip": ["--resume_from_checkpoint", "{own_checkpoint}"],
    "activation_checkpointing_kwargs": ["--activation_checkpointing"],
    "training_sft:shuffle_buffer": ["--streaming"],
    "training_sft:truncation_mode": ["--packing", "false"],
    "training_dpo:discopop_tau": ["--loss_type", "discopop"],
    "training_dpo:ref_model_mixup_alpha": ["--sync_ref_model", "--use_peft", "false", "--ref_model_sync_steps", "1"],
    "training_dpo:ref_model_sync_steps": ["--sync_ref_model", "--use_peft", "false"],
    "training_dpo:loss_weights": ["--loss_type", "sigmoid", "sft"],
    "training_rl:num_generations": ["--algorithm", "rloo", "--batch_size", "4", "--gradient_accumulation_steps", "1"],
    "training_rl:eval_data_dir": ["--eval_freq", "1"],
    "training_rl:eval_prompts": ["--eval_freq", "1"],
    "optim_target_modules": ["--optim", "galore_adamw"],
    "hub_model_id": ["--push_to_hub"],
    "hub_token": ["--push_to_hub"],
    "hub_strategy": ["--push_to_hub"],
    "hub_private_repo": ["--push_to_hub"],
    "hub_always_push": ["--push_to_hub"],
    "hub_revision": ["--push_to_hub"],
    "merge_with_lora:hub_model_id": ["--push_to_hub"],
    "greater_is_better": ["--load_best_model_at_end", "--metric_for_best_model", "loss"],
    "metric_for_best_model": ["--load_best_model_at_end"],
    "torch_compile_backend": ["--torch_compile"],
    "torch_compile_mode": ["--torch_compile"],
    "bnb_4bit_quant_type": ["--load_in_4bit"],
    "use_bnb_nested_quant": ["--load_in_4bit"],
    "bnb_4bit_quant_storage": ["--load_in_4bit"],
    "lora_r": [], "lora_alpha": [],
    "lora_dropout": [],
    "dataloader_prefetch_factor": ["--dataloader_num_workers", "1"],
    "dataloader_persistent_workers": ["--dataloader_num_workers", "1"],
    "dataloader_multiprocessing_context": ["--dataloader_num_workers", "1"],
    "length_column_name": ["--train_sampling_strategy", "group_by_length"],
    "liger_kernel_config": ["--use_liger_kernel"],
    "fsdp_config": ["--fsdp", "full_shard"],
    "training_sft:pad_to_multiple_of": ["--packing", "false"],
    "eval_packing": ["--packing", "false"],
    "evaluate:best_of_n_model": [],
}

# Fields that may legitimately go unread after parsing in the audit's runs (one process, CPU, no Hub): why.
INERT: dict[str, str] = {
    "config": "read by the parser itself (YAML defaults)",
    "local_rank": "set by torchrun; read while parsing (device setup), one process here",
    "ddp_find_unused_parameters": "used only with several processes (DDP)",
    "ddp_bucket_cap_mb": "used only with several processes (DDP)",
    "ddp_broadcast_buffers": "used only with several processes (DDP)",
    "ddp_static_graph": "used only with several processes (DDP)",
    "ddp_backend": "used only with several processes",
    "ddp_timeout": "used only with several processes",
    "log_on_each_node": "used only with several nodes",
    "save_on_each_node": "used only with several nodes",
    "log_level_replica": "used only on processes other than the main one",
    "hub_token": "used only with --push_to_hub",
    "hub_private_repo": "used only with --push_to_hub",
    "hub_always_push": "used only with --push_to_hub",
    "hub_revision": "used only with --push_to_hub",
    "hub_strategy": "used only with --push_to_hub",
    "trackio_space_id": "used only with --report_to trackio",
    "trackio_bucket_id": "used only with --report_to trackio",
    "trackio_static_space_id": "used only with --report_to trackio",
    "project": "used only with --report_to trackio",
    "run_name": "used only by trackers (--report_to)",
    "eval_use_gather_object": "used only with several processes",
    "do_train": "not used by the Trainer (a switch of transformers' example scripts): these scripts always train",
    "do_eval": "not used by the Trainer (a switch of transformers' example scripts): --eval_strategy decides",
    "do_predict": "not used by the Trainer (a switch of transformers' example scripts): nothing here predicts",
    "average_tokens_across_devices": "used only with several processes",
    "prediction_loss_only": "these trainers evaluate through their loss and gather no predictions to skip",
    "precompute_ref_batch_size": "used only with --precompute_ref_log_probs, which training_dpo.py refuses",
    "length_column_name": "used only with --train_sampling_strategy group_by_length",
}

# Fields whose effect is applied while the arguments are parsed (TrainingArguments.__post_init__), so nothing needs
# to read them afterwards: why that is their use.
APPLIED_WHILE_PARSING: dict[str, str] = {
    "bf16": "sets TrainingArguments.mixed_precision, which accelerate autocasts with",
    "fp16": "sets TrainingArguments.mixed_precision, which accelerate autocasts with",
    "torch_compile": "sets accelerate's dynamo backend (ACCELERATE_DYNAMO_BACKEND), which compiles the model",
    "use_cpu": "chooses the device (CPU here either way: no GPU)",
    "tf32": "sets torch's TF32 switches (Ampere GPUs only)",
}

# Values whose run needs something in the output folder first: "model" (a final model: --overwrite_output_dir
# replaces it) or "eval" (an earlier evaluation's eval.json).
PREPARE: dict[str, str] = {
    "overwrite_output_dir": "model",
    "merge_with_lora:overwrite": "model",
    "evaluate:overwrite_output_dir": "eval",
}


class Fixtures:
    """The tiny models and data subsets the runs use, built once in ``root``."""

    def __init__(self, root: str):
        self.root = root
        self.data = os.path.join(root, "data")
        self.data_file = os.path.join(self.data, "finetune", "train.jsonl")
        self.model = os.path.join(root, "model")
        self.sft = os.path.join(root, "sft")
        self.rm = os.path.join(root, "rm")
        self.dpo = os.path.join(root, "dpo")
        self.rl = os.path.join(root, "rl")
        self.checkpoint = os.path.join(self.sft, "checkpoint-1")
        self.rm_checkpoint = os.path.join(self.rm, "checkpoint-1")
        self.dpo_checkpoint = os.path.join(self.dpo, "checkpoint-1")
        self.rl_checkpoint = os.path.join(self.rl, "checkpoint-1")
        self.yaml = os.path.join(root, "run.yaml")
        self.yaml_merge = os.path.join(root, "merge.yaml")
        self.deepspeed = os.path.join(root, "ds_zero2.json")
        self.chat_template = os.path.join(root, "template.jinja")

    def paths(self, script: str | None = None) -> dict[str, str]:
        """Every fixture path by name; ``own_checkpoint`` is a checkpoint of ``script``'s stage, ``other_checkpoint``
        one of another stage's."""
        own = {"training_sft": self.checkpoint, "training_reward_model": self.rm_checkpoint,
               "training_dpo": self.dpo_checkpoint, "training_rl": self.rl_checkpoint}
        other = {"training_sft": self.rm_checkpoint}
        return {**{k: v for k, v in vars(self).items() if isinstance(v, str)},
                "own_checkpoint": own.get(script, self.checkpoint),
                "other_checkpoint": other.get(script, self.checkpoint)}

    def build_small_files(self) -> None:
        """A YAML for --config, a DeepSpeed config, a chat template."""
        import yaml

        os.makedirs(self.root, exist_ok=True)
        with open(self.yaml, "w", encoding="utf-8") as f:
            yaml.safe_dump({"seed": 1}, f)
        with open(self.yaml_merge, "w", encoding="utf-8") as f:
            yaml.safe_dump({"tolerance": 0.5}, f)
        with open(self.deepspeed, "w", encoding="utf-8") as f:
            json.dump({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                       "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}, f)
        with open(self.chat_template, "w", encoding="utf-8") as f:
            f.write("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")

    def build_stubs(self) -> None:
        """For parse-only runs: the small files, and model and adapter folders that hold only their config (the
        argument checks look for those, nothing loads them)."""
        self.build_small_files()
        for folder, name, content in ((self.model, "config.json", {}),
                                      (self.sft, "adapter_config.json", {"base_model_name_or_path": self.model}),
                                      (self.rm, "adapter_config.json", {"base_model_name_or_path": self.model}),
                                      (self.checkpoint, "trainer_state.json", {}),
                                      (self.rm_checkpoint, "trainer_state.json", {}),
                                      (self.dpo_checkpoint, "trainer_state.json", {}),
                                      (self.rl_checkpoint, "trainer_state.json", {})):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(content, f)
        with open(os.path.join(self.rm, "reward_stats.json"), "w", encoding="utf-8") as f:
            json.dump({"mean": 0.0, "std": 1.0}, f)
        os.makedirs(os.path.dirname(self.data_file), exist_ok=True)
        open(self.data_file, "a", encoding="utf-8").close()

    def build_files(self, rows: int = 24) -> None:
        """Everything but the trained adapters: data subsets, the tiny model, the small files."""
        self.build_small_files()
        for split in ("finetune", "reward", "evaluation", "rl"):
            os.makedirs(os.path.join(self.data, split), exist_ok=True)
            with open(os.path.join(ROOT, "data", split, "train.jsonl"), encoding="utf-8") as src, \
                    open(os.path.join(self.data, split, "train.jsonl"), "w", encoding="utf-8") as dst:
                for i, line in enumerate(src):
                    if i >= rows:
                        break
                    dst.write(line)
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            from transformers import AutoTokenizer

            from common.tiny_model import build_model

            tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny-pretrained"))
            model = build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
            model.save_pretrained(self.model)
            tokenizer.save_pretrained(self.model)


def base_args(script: str, fx: Fixtures, out: str) -> list[str]:
    """The command each run of ``script`` starts from (its flags under audit change one thing of it)."""
    trainer = ["--max_steps", "1", "--logging_steps", "1", "--eval_steps", "1", "--save_steps", "1",
               "--disable_tqdm", "true", "--output_dir", out]
    if script == "training_sft":
        return ["--model_name_or_path", fx.model, "--dataset_name", fx.data, "--subset", "finetune",
                "--size_valid_set", "2", "--seq_length", "64", "--per_device_train_batch_size", "2",
                "--per_device_eval_batch_size", "2", *trainer]
    if script == "training_reward_model":
        return ["--model_name_or_path", fx.model, "--dataset_name", fx.data, "--train_data_dir", "reward",
                "--eval_data_dir", "evaluation", "--train_subset", "4", "--eval_subset", "2", "--max_length", "512",
                "--per_device_train_batch_size", "2", *trainer]
    if script == "training_dpo":
        return ["--model_name_or_path", fx.model, "--dataset_name", fx.data, "--train_data_dir", "rl",
                "--eval_data_dir", "evaluation", "--train_subset", "4", "--eval_subset", "2", "--max_length", "512",
                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", *trainer]
    if script == "training_rl":
        return ["--model_name", fx.model, "--reward_model_name", fx.rm, "--dataset_name", fx.data, "--subset", "rl",
                "--steps", "2", "--batch_size", "2", "--mini_batch_size", "1", "--gradient_accumulation_steps", "2",
                "--ppo_epochs", "1", "--output_min_length", "4", "--output_max_length", "8", "--reward_batch_size",
                "2", "--eval_prompts", "2", "--eval_data_dir", "evaluation", "--disable_tqdm", "true",
                "--output_dir", out]
    if script == "merge_with_lora":
        return ["--adapter_model_name", fx.sft, "--output_name", out]
    if script == "evaluate":
        return ["--models", f"a={fx.model}", f"b={fx.sft}", "--reward_model_name", fx.rm, "--dataset_name", fx.data,
                "--subset", "evaluation", "--num_prompts", "2", "--max_new_tokens", "4", "--batch_size", "2",
                "--best_of_n", "2", "--best_of_n_prompts", "2", "--bootstrap_resamples", "20", "--num_examples", "1",
                "--disable_tqdm", "true", "--output_dir", out]
    raise ValueError(script)


# The parse-only base commands: what parse and the argument checks need, no files.
PARSE_BASE = {
    "training_sft": ["--model_name_or_path", "m", "--output_dir", "out"],
    "training_reward_model": ["--model_name_or_path", "m", "--output_dir", "out"],
    "training_dpo": ["--model_name_or_path", "m", "--output_dir", "out"],
    "training_rl": ["--model_name", "{model}", "--reward_model_name", "{rm}", "--output_dir", "out"],
    "merge_with_lora": ["--adapter_model_name", "{sft}", "--output_name", "out"],
    "evaluate": ["--models", "a={model}", "b={sft}", "--reward_model_name", "{rm}", "--output_dir", "out"],
}


def check_parsed(script: str, module, parsed: tuple) -> None:
    """The script's argument checks that need no files (the parse-only tier)."""
    if script in ("training_sft", "training_reward_model", "training_dpo"):
        module.check_args(*parsed[:2])
    elif script == "training_rl":
        module.check_args(*parsed)
    elif script == "evaluate":
        module.check_args(*parsed)


# ----------------------------------------------------------------------------------------------- flags and values


class _Captured(Exception):
    pass


def script_parser(module):
    """The parser of ``module``'s flags, built from what its ``parse`` passes to ``common.cli.parse_args``, and the
    arguments it was built from (``types``, ``aliases``, ``defaults``)."""
    from common import cli

    captured = {}

    def capture(dataclass_types, aliases=None, defaults=None, args=None, description=None, *, kwargs=None, hints=None):
        captured.update(types=list(dataclass_types), aliases=aliases, defaults=defaults, description=description)
        raise _Captured

    real = module.parse_args
    module.parse_args = capture
    try:
        module.parse([])
    except _Captured:
        pass
    finally:
        module.parse_args = real
    parser, _ = cli.build_parser(captured["types"], captured["aliases"], captured["defaults"],
                                 captured["description"])
    return parser, captured


def flag_actions(parser) -> list:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def flag_name(action) -> str:
    return action.option_strings[0]


def _is_bool(action) -> bool:
    return getattr(action.type, "__name__", "") in ("string_to_bool", "str2bool")


def _lookup(table: dict, script: str, dest: str):
    return table.get(f"{script}:{dest}", table.get(dest))


def values(script: str, action, current) -> list:
    """The values to try for ``action`` when the base command gives it ``current``: each a list of words."""
    if action.nargs == 0:  # --no_x: the complement of a field that defaults to True
        return [[]]
    chosen = _lookup(VALUES, script, action.dest)
    if chosen is not None:
        return [v if isinstance(v, list) else [v] for v in chosen]
    return _generic_values(action, current) + [list(v) for v in _lookup(EXTRA_VALUES, script, action.dest) or []]


def _generic_values(action, current) -> list:
    if _is_bool(action):
        if current is None:
            return [["true"], ["false"]]
        return [["false" if current else "true"]]
    if action.choices:
        return [[str(c)] for c in action.choices if c is not None and c != current and str(c) != str(current)]
    number = getattr(action.type, "__name__", "")
    if number == "int":
        if current is None or current <= 0:
            return [["1"]]
        return [[str(current + 1 if current <= 2 else max(1, current // 2))]]
    if number == "float":
        if current is None or current <= 0:
            return [["0.1"]]
        return [[f"{current / 2:g}"]]
    return [["audit"]]


@dataclasses.dataclass
class Case:
    script: str
    flag: str
    dest: str
    words: list[str]  # the flag and its value(s), as on a command line
    extra: list[str]  # flags the value needs (WITH)

    @property
    def label(self) -> str:
        return " ".join([self.flag, *self.words[1:]] + (["(with " + " ".join(self.extra) + ")"] if self.extra else []))


def cases(script: str, flags: list[str] | None = None, fx: Fixtures | None = None) -> list[Case]:
    """Every (flag, value) case of ``script`` (or of the named ``flags``), its values chosen against the base
    command's (the run's with ``fx``, else the parse-only one)."""
    import importlib

    module = importlib.import_module(script)
    parser, _ = script_parser(module)
    base = base_args(script, fx, "{out}") if fx is not None else PARSE_BASE[script]
    current, unknown = parser.parse_known_args(base)
    if unknown:  # a script renamed a flag the base command uses
        raise SystemExit(f"scripts/audit_flags.py: the base command of {script} has flags it no longer knows: "
                         f"{' '.join(unknown)} (update base_args / PARSE_BASE)")
    out = []
    for action in flag_actions(parser):
        name = flag_name(action)
        if flags and name.lstrip("-") not in flags and action.dest not in flags:
            continue
        extra = _lookup(WITH, script, action.dest) or []
        for value in values(script, action, getattr(current, action.dest, None)):
            out.append(Case(script, name, action.dest, [name, *value], list(extra)))
    return out


def expand(words: list[str], fx: Fixtures | None, out: str, script: str | None = None) -> list[str]:
    paths = {**(fx.paths(script) if fx else {}), "out": out}
    return [w.format(**paths) if "{" in w and "}" in w and not w.startswith(("{\"", "{}")) else w for w in words]


# ----------------------------------------------------------------------------------------------- tracing reads

_READS: dict[str, set] = {}  # field -> phases ("parse", "use") in which something read it
_PHASE = ["parse"]
_SERIALIZERS = {"to_dict", "to_sanitized_dict", "to_json_string", "__repr__", "__str__", "asdict", "_asdict_inner",
                "astuple", "replace", "write_run_args", "_plain", "__eq__", "__getstate__", "__deepcopy__"}


def _tracked(cls):
    """A subclass of the dataclass ``cls`` (same name, same fields) that records which fields are read, and where."""
    names = {f.name for f in dataclasses.fields(cls)}
    base_get = cls.__getattribute__

    def __getattribute__(self, name):
        if name in names:
            frame = sys._getframe(1)
            caller, parent = frame.f_code, frame.f_back.f_code if frame.f_back else None
            serializing = (caller.co_filename in ("<string>",) or caller.co_filename.endswith(("dataclasses.py",
                                                                                             "copy.py"))
                           or caller.co_name in _SERIALIZERS or (parent is not None and parent.co_name in _SERIALIZERS))
            if not serializing:
                _READS.setdefault(name, set()).add(_PHASE[0])
        return base_get(self, name)

    qualname = f"_Tracked_{cls.__name__}"
    sub = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": __name__,
                                      "__qualname__": qualname})
    globals()[qualname] = sub  # so that pickle (training_args.bin) finds it
    return sub


def _traced_parse(module, argv: list[str]) -> tuple:
    """``module.parse(argv)`` with every dataclass traced (``_tracked``); reads from here on are "use" reads."""
    from common import cli

    def parse_args(dataclass_types, *args, **kwargs):
        return cli.parse_args([_tracked(t) for t in dataclass_types], *args, **kwargs)

    real = module.parse_args
    module.parse_args = parse_args
    try:
        parsed = module.parse(argv)
    finally:
        module.parse_args = real
    _PHASE[0] = "use"
    return parsed


# ----------------------------------------------------------------------------------------------- running a case


def _one_line_naming(message: str, case: Case) -> str | None:
    """Why a refusal's message is not one line naming the flag, or None."""
    if "\n" in message.strip():
        return "the error is several lines"
    names = {case.dest, case.flag.lstrip("-"), *(w.lstrip("-") for w in case.extra if w.startswith("--"))}
    if not any(n in message for n in names):
        return "the error does not name the flag"
    return None


def classify(case: Case, outcome: dict) -> dict:
    """``outcome`` (what the run raised, which phases read the field) as works / refused / broken, with the reason."""
    kind, message = outcome["kind"], outcome.get("message", "")
    if kind == "user_error":
        why = _one_line_naming(message, case)
        return {"status": "broken" if why else "refused", "reason": f"{why}: {message}" if why else message}
    if kind == "exception":
        return {"status": "broken", "reason": message}
    if kind == "timeout":
        return {"status": "broken", "reason": message}
    phases = outcome.get("reads", [])
    if outcome.get("ran") and "use" not in phases and case.dest != "config":
        inert = INERT.get(case.dest)
        if case.dest in APPLIED_WHILE_PARSING:
            return {"status": "works", "reason": f"applied while parsing: {APPLIED_WHILE_PARSING[case.dest]}"}
        if inert:
            return {"status": "works", "reason": f"no effect here: {inert}"}
        where = "read only while parsing" if phases else "never read"
        return {"status": "broken", "reason": f"silently ignored: the field is {where}"}
    return {"status": "works", "reason": outcome.get("note", "")}


def _exception_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def run_case(case: Case, fx: Fixtures, out: str, run: bool = True) -> dict:
    """Run one case here (in a forked child for full runs): parse, then the checks or ``main``. Returns the
    outcome before classification."""
    import importlib

    from common.errors import UserError

    module = importlib.import_module(case.script)
    _READS.clear()
    _PHASE[0] = "parse"
    base = base_args(case.script, fx, out) if run else PARSE_BASE[case.script]
    argv = expand(base + case.extra + case.words, fx, out, case.script)
    outcome = {"argv": argv}
    try:
        parsed = _traced_parse(module, argv)
        if not run:
            check_parsed(case.script, module, parsed)
        else:
            module.main(*parsed)
            outcome["ran"] = True
        outcome["kind"] = "ok"
    except UserError as e:
        outcome.update(kind="user_error", message=str(e))
    except SystemExit as e:
        outcome.update(kind="exception", message=f"SystemExit({e.code})")
    except Exception as e:  # noqa: BLE001  (anything else is what the audit looks for)
        outcome.update(kind="exception", message=_exception_line(e), traceback=traceback.format_exc()[-3000:])
    outcome["reads"] = sorted(_READS.get(case.dest, ()))
    return outcome


def parse_only(case: Case, fx: Fixtures) -> dict:
    """Parse + the script's argument checks, in this process (``fx``: ``Fixtures.build_stubs``)."""
    outcome = run_case(case, fx, os.path.join(fx.root, "out"), run=False)
    outcome.pop("ran", None)
    return {**outcome, **classify(case, outcome)}


def _child(case: Case, fx: Fixtures, out: str, result_path: str, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.makedirs(out, exist_ok=True)
    os.chdir(out)  # anything written to a relative path lands in the case's folder
    prepare = _lookup(PREPARE, case.script, case.dest)
    if prepare == "model":
        shutil.copytree(fx.model, os.path.join(out, "run"))
    elif prepare == "eval":
        os.makedirs(os.path.join(out, "run"))
        with open(os.path.join(out, "run", "eval.json"), "w", encoding="utf-8") as f:
            f.write("{}")
    code = 0
    try:
        import torch

        torch.set_num_threads(1)
        outcome = run_case(case, fx, os.path.join(out, "run"))
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump(outcome, f)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_all(all_cases: list[Case], fx: Fixtures, work: str, jobs: int, timeout: float, *, verbose: bool) -> list[dict]:
    """Every case in a forked child, ``jobs`` at a time."""
    results: list[dict | None] = [None] * len(all_cases)
    pending = list(range(len(all_cases)))
    running: dict[int, tuple[int, float]] = {}  # pid -> (case index, start)
    done = 0
    start_all = time.monotonic()

    def finish(i: int, outcome: dict, seconds: float) -> None:
        nonlocal done
        case = all_cases[i]
        results[i] = {"script": case.script, "flag": case.flag, "dest": case.dest, "value": " ".join(case.words[1:]),
                      "with": " ".join(case.extra), "seconds": round(seconds, 2), **outcome, **classify(case, outcome)}
        results[i]["reason"] = results[i]["reason"].replace(work, "<work>")
        done += 1
        shutil.rmtree(os.path.join(work, f"case{i}"), ignore_errors=True)
        if verbose or results[i]["status"] != "works":
            print(f"[{done}/{len(all_cases)} {time.monotonic() - start_all:.0f}s] {case.script} {case.label}: "
                  f"{results[i]['status']} ({seconds:.1f}s) {results[i]['reason'][:200]}", flush=True)

    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop(0)
            case_dir = os.path.join(work, f"case{i}")
            os.makedirs(case_dir, exist_ok=True)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(all_cases[i], fx, case_dir, os.path.join(work, f"result{i}.json"),
                       os.path.join(work, f"log{i}.txt"))
            running[pid] = (i, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for pid, (i, t0) in list(running.items()):
                if time.monotonic() - t0 > timeout:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    del running[pid]
                    finish(i, {"kind": "timeout", "message": f"no result within {timeout:.0f}s (hangs?)"},
                           time.monotonic() - t0)
            time.sleep(0.05)
            continue
        if pid not in running:
            continue
        i, t0 = running.pop(pid)
        result_path = os.path.join(work, f"result{i}.json")
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                outcome = json.load(f)
        else:
            with open(os.path.join(work, f"log{i}.txt"), encoding="utf-8", errors="replace") as f:
                tail = f.read()[-2000:]
            outcome = {"kind": "exception", "message": f"the process died (status {status}): "
                                                       f"{tail.strip().splitlines()[-1] if tail.strip() else ''}"}
        finish(i, outcome, time.monotonic() - t0)
    return results


def _fast_runs(work: str) -> None:
    """What makes a run cost about a second rather than five, without changing what a flag does: the data sets'
    fingerprints are random (datasets hashes the tokenizer with dill for every map, seconds a run; the cache it
    keys is of no use to one-off runs), their cache files go under ``work``, and the objects of the imported
    libraries are frozen out of the garbage collector (accelerate's ``free_memory`` collects at every run)."""
    import gc

    import datasets
    import datasets.fingerprint

    os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "datasets-cache")
    datasets.config.HF_DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"]
    datasets.fingerprint.update_fingerprint = lambda *a, **k: datasets.fingerprint.generate_random_fingerprint()
    for script in SCRIPTS:  # everything a run imports lazily, imported once here
        __import__(script)
    import peft  # noqa: F401
    import transformers.integrations  # noqa: F401
    gc.collect()
    gc.freeze()


def build_fixtures(fx: Fixtures, work: str, timeout: float) -> None:
    """The tiny model and data, then one base run of each training stage: the SFT and reward-model adapters are
    the inputs of the RL, merge and evaluate runs, and every run's checkpoint-1 is its stage's checkpoint for
    --resume_from_checkpoint."""
    fx.build_files()
    for script, target in (("training_sft", fx.sft), ("training_reward_model", fx.rm), ("training_dpo", fx.dpo),
                           ("training_rl", fx.rl)):
        if os.path.isfile(os.path.join(target, "adapter_config.json")):
            continue
        case = Case(script, "(base)", "", [], ["--save_freq", "1"] if script == "training_rl" else [])
        pid = os.fork()
        if pid == 0:
            _child(case, fx, os.path.join(work, f"fixture-{script}"), os.path.join(work, f"fixture-{script}.json"),
                   os.path.join(work, f"fixture-{script}.log"))
        os.waitpid(pid, 0)
        shutil.move(os.path.join(work, f"fixture-{script}", "run"), target)
        if not os.path.isfile(os.path.join(target, "adapter_config.json")):
            with open(os.path.join(work, f"fixture-{script}.log"), encoding="utf-8", errors="replace") as f:
                raise SystemExit(f"the base run of {script} failed:\n{f.read()[-3000:]}")


# ----------------------------------------------------------------------------------------------- the report


def summary(results: list[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for script in SCRIPTS:
        rows = [r for r in results if r["script"] == script]
        if not rows:
            continue
        flags = {r["flag"] for r in rows}
        worst = {}
        for r in rows:  # a flag's outcome: broken if any value is, else refused if any is, else works
            order = {"works": 0, "refused": 1, "broken": 2}
            worst[r["flag"]] = max(worst.get(r["flag"], "works"), r["status"], key=order.get)
        table[script] = {"flags": len(flags), "cases": len(rows),
                         **{s: sum(v == s for v in worst.values()) for s in ("works", "refused", "broken")},
                         **{f"{s}_cases": sum(r["status"] == s for r in rows) for s in ("works", "refused", "broken")}}
    return table


def markdown(results: list[dict], parse_results: list[dict], seconds: float, jobs: int) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")[:400]

    lines = ["# Flags: what each one does on the sample data", "",
             "Written by `python scripts/audit_flags.py` (rerun it after a library upgrade); the method is in its "
             "docstring. Every flag of every script's `--help` is given one or more values that differ from a base "
             "command; each (flag, value) runs the script's `parse` and `main` on a tiny random Llama and 24 rows of "
             "each sample-data split (one optimizer step; PPO one step of 2 episodes; evaluate 2 prompts), on CPU. "
             "`works`: the run finished and something read the field after parsing; `refused`: one `error:` line "
             "naming the flag; `broken`: anything else (a traceback, a hang, a multi-line or anonymous error, a "
             "field nothing reads).", "",
             f"Run: {len(results)} cases in {seconds / 60:.1f} min with {jobs} parallel runs "
             f"(torch {_version('torch')}, transformers {_version('transformers')}, trl {_version('trl')}, "
             f"peft {_version('peft')}, accelerate {_version('accelerate')}). A flag counts as refused or broken "
             "if any of its values is.", "",
             "| script | flags | works | refused | broken | cases (values) |", "|---|---|---|---|---|---|"]
    for script, row in summary(results).items():
        lines.append(f"| {script} | {row['flags']} | {row['works']} | {row['refused']} | {row['broken']} | "
                     f"{row['cases']} |")
    lines += ["", "Parse-only (the test `tests/test_flags.py::test_every_flag_parses_or_is_refused_with_one_line`: "
              "parse + the script's argument checks, every flag and value):", "",
              "| script | flags | works | refused | broken |", "|---|---|---|---|---|"]
    for script, row in summary(parse_results).items():
        lines.append(f"| {script} | {row['flags']} | {row['works']} | {row['refused']} | {row['broken']} |")
    ran = {(r["script"], r["flag"]) for r in results}
    only_parsed = sorted({(r["script"], r["flag"]) for r in parse_results} - ran)
    lines += ["", "## Only parsed, not run", ""]
    lines += [f"- {s} `{f}`" for s, f in only_parsed] or ["None: every flag was run."]
    lacks = {}
    for r in results:
        if r["status"] != "refused":
            continue
        for needle, what in LACKS:
            if needle in r["reason"]:
                by_value = r["flag"] in ("--optim", "--report_to", "--attn_implementation")
                key = (r["flag"], r["value"] if by_value else "")
                lacks.setdefault(what, {}).setdefault(key, set()).add(r["script"])
                break
    lines += ["", "## Refused here for what this machine lacks", "",
              "These may work where the missing piece is (they were refused on a CPU-only machine, without optional "
              "packages, offline, in a plain python process); the message says what is needed.", ""]
    for what, flags in lacks.items():
        names = ", ".join(f"`{f}{' ' + v if v else ''}`" for f, v in sorted(flags))
        lines.append(f"- {what}: {names}")
    lines += ["", "## What `works` does not show", "",
              "A flag that works ran one step and something read it; whether its effect is right is for the tests of "
              "each stage. Fields nothing reads after parsing are `works` only with a reviewed reason (`INERT`, "
              "`APPLIED_WHILE_PARSING` in the audit): those rows below say `no effect here` or `applied while "
              "parsing`. GPU-only effects (bf16/fp16 autocast on a GPU, paged optimizers, pinned memory, "
              "multi-process flags) ran on CPU, where some mean less."]
    for script in SCRIPTS:
        rows = [r for r in results if r["script"] == script and (r["status"] != "works" or r["reason"])]
        if not rows:
            continue
        lines += ["", f"## {script}", "", "| flag | value | outcome | message or reason |", "|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: ({"broken": 0, "refused": 1, "works": 2}[r["status"]], r["flag"])):
            value = r["value"] + (f" (with {r['with']})" if r["with"] else "")
            lines.append(f"| `{r['flag']}` | {cell(value) or '(bare)'} | {r['status']} | {cell(r['reason'])} |")
    return "\n".join(lines) + "\n"


# Refusals that come from the machine, not the value: (a words of the message, what the machine lacks).
LACKS = [("GPU", "a GPU"), ("launcher", "a distributed launch (torchrun, accelerate launch, deepspeed)"),
         ("HF_HUB_OFFLINE", "the Hub (the audit runs offline)"), ("not installed", "an optional package"),
         ("install", "an optional package"), ("package", "an optional package"), ("Ampere", "a GPU")]


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    parser.add_argument("--flags", nargs="+", default=None, help="Only these flags (names without dashes).")
    parser.add_argument("--parse_only", action="store_true", help="Parse and check only (in this process).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time.")
    parser.add_argument("--timeout", type=float, default=120, help="Seconds before a run counts as hung.")
    parser.add_argument("--work_dir", default=None, help="Fixtures and runs (default: a temporary folder).")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "flags.md"),
                        help="The markdown report ('' for none); only written by a whole audit.")
    parser.add_argument("--json", default=None, help="Every outcome as JSON.")
    parser.add_argument("--verbose", action="store_true", help="Print every case, not only refused and broken.")
    args = parser.parse_args(argv)
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)

    import torch

    torch.set_num_threads(1)  # children fork from here: no OpenMP pool may exist in the parent
    t0 = time.monotonic()
    parse_results = []
    stubs = Fixtures(tempfile.mkdtemp(prefix="audit_flags-stubs-"))
    stubs.build_stubs()
    for script in args.scripts:
        for case in cases(script, args.flags):
            r = parse_only(case, stubs)
            r["reason"] = r["reason"].replace(stubs.root, "<work>")
            parse_results.append({"script": case.script, "flag": case.flag, "dest": case.dest,
                                  "value": " ".join(case.words[1:]), "with": " ".join(case.extra), **r})
            if r["status"] == "broken" or (args.parse_only and args.verbose):
                print(f"parse {script} {case.label}: {r['status']} {r['reason'][:200]}", flush=True)
    shutil.rmtree(stubs.root, ignore_errors=True)
    print(f"parse-only: {len(parse_results)} cases in {time.monotonic() - t0:.0f}s: "
          + ", ".join(f"{s} {sum(r['status'] == s for r in parse_results)}" for s in ("works", "refused", "broken")),
          flush=True)
    results = []
    if not args.parse_only:
        work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="audit_flags-"))
        _fast_runs(work)
        fx = Fixtures(os.path.join(work, "fixtures"))
        all_cases = [c for script in args.scripts for c in cases(script, args.flags, fx)]
        t1 = time.monotonic()
        build_fixtures(fx, work, args.timeout)
        print(f"fixtures: {time.monotonic() - t1:.0f}s", flush=True)
        t1 = time.monotonic()
        results = run_all(all_cases, fx, work, args.jobs, args.timeout, verbose=args.verbose)
        seconds = time.monotonic() - t1
        for script, row in summary(results).items():
            print(f"{script}: {row}")
        print(f"runs: {len(results)} cases in {seconds / 60:.1f} min")
        if args.output and not args.flags and args.scripts == SCRIPTS:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(markdown(results, parse_results, seconds, args.jobs))
            print(f"wrote {args.output}")
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"parse_only": parse_results, "runs": results}, f, indent=1)
    broken = [r for r in parse_results + results if r["status"] == "broken"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
