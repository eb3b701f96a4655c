"""Our GRPO (`training_rl.py --algorithm grpo`) against TRL's `GRPOTrainer` on the same setup: episodes per second
and peak memory, whole runs in turn.

    bash scripts/run_pipeline.sh                     # once: the demo's SFT model and reward model (runs/pipeline)
    python benchmarks/grpo_vs_trl.py --rounds 3 --output grpo_vs_trl.json
    python benchmarks/grpo_vs_trl.py --side trl      # one side alone (prints one JSON line)

Setup (both sides): the policy `ROOT/sft_merged` with the project's LoRA (r 16, alpha 32, dropout 0.05 on every
linear layer but the head: `common.modeling.lora_config` builds it for both), float32, CPU, no gradient checkpointing,
dropout off; the reward model `ROOT/rm` scoring `Question: ...\\n\\nAnswer: <answer>` re-tokenized with its own
tokenizer (`common.reward.score_texts`; TRL gets it as a reward *function*, so it scores the same text and the BOS
its reward model was trained with); prompts from data/rl in file order; each step 4 prompts x 4 answers of exactly
`--length` new tokens (EOS suppressed, sampling at temperature 1 without top-k/top-p), group-normalised advantages,
the k3 KL in the loss with a fixed coefficient 0.04 against the adapter-disabled model, token-level loss (TRL's
`dapo`, ours `token`), one pass over the 16 answers as one optimizer step (TRL: `num_iterations` 1,
`steps_per_generation` 1; ours: `--ppo_epochs 1 --mini_batch_size 16`), AdamW lr 1e-5, clip 0.2.

A side's step time: TRL, between consecutive `on_step_end` callbacks (generation, scoring, reference log-probs and
the update all happen inside its step); ours, the step's `time/generate + time/score + time/train` from
`metrics.jsonl` (the same work; our metrics writing falls outside it, TRL's logging inside: a bias of a few
milliseconds per step against TRL). The first `--warmup` steps are left out. Peak memory: each side's process
alone (VmHWM), models loaded, whole run. Rounds alternate which side runs first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _setup import ROOT  # first: the repository on sys.path, offline, passive OpenMP
from run import vmhwm_bytes

PROMPTS, GENERATIONS, KL, LR, CLIP, LORA = 4, 4, 0.04, 1e-5, 0.2, {"lora_r": 16, "lora_alpha": 32,
                                                                    "lora_dropout": 0.05}


def run_ours(a, work: str) -> dict:
    """``training_rl.py --algorithm grpo`` in this process; its steps' times from ``metrics.jsonl``."""
    import training_rl

    out = os.path.join(work, "ours")
    argv = ["--algorithm", "grpo", "--model_name", a.model, "--reward_model_name", a.reward_model,
            "--dataset_name", ".", "--subset", "data/rl", "--output_dir", out, "--seed", str(a.seed),
            "--steps", str(PROMPTS * GENERATIONS * (a.warmup + a.steps)), "--batch_size", str(PROMPTS * GENERATIONS),
            "--num_generations", str(GENERATIONS), "--mini_batch_size", str(PROMPTS * GENERATIONS),
            "--gradient_accumulation_steps", "1", "--ppo_epochs", "1", "--output_min_length", str(a.length),
            "--output_max_length", str(a.length), "--learning_rate", str(LR), "--cliprange", str(CLIP),
            "--init_kl_coef", str(KL), "--adap_kl_ctrl", "false", "--scale_rewards", "group", "--loss_type", "token",
            "--lora_r", str(LORA["lora_r"]), "--lora_alpha", str(LORA["lora_alpha"]),
            "--lora_dropout", str(LORA["lora_dropout"]), "--save_freq", "100000", "--disable_tqdm", "true"]
    training_rl.main(*training_rl.parse(argv))
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line) for line in f if line.strip()]
    times = [m["time/generate"] + m["time/score"] + m["time/train"] for m in steps]
    return {"step_s": times[a.warmup:], "scores": [m["objective/scores"] for m in steps]}


def run_trl(a, work: str) -> dict:
    """TRL's ``GRPOTrainer`` on the same models, prompts and settings; step times from its callbacks."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common.data import load_and_validate
    from common.modeling import ModelArguments, load_model, load_tokenizer, lora_config
    from common.prompts import format_example, format_prompt
    from common.reward import score_texts

    tokenizer = load_tokenizer(a.model, False, "left")
    policy = load_model(ModelArguments(model_name_or_path=a.model, dtype="float32", use_peft=False), "CAUSAL_LM",
                        False, tokenizer.pad_token_id)
    rm_tokenizer = load_tokenizer(a.reward_model, False, "right")
    rm = load_model(ModelArguments(model_name_or_path=a.reward_model, dtype="float32", use_peft=False), "SEQ_CLS",
                    False, rm_tokenizer.pad_token_id).eval()
    questions = load_and_validate(".", "data/rl", "train", ["question"]).dataset["question"]
    n = PROMPTS * (a.warmup + a.steps)
    dataset = Dataset.from_dict({"prompt": [format_prompt(q) for q in questions[:n]], "question": questions[:n]})

    def reward(prompts, completions, question, **kwargs):
        texts = [format_example(q, c) for q, c in zip(question, completions)]
        with torch.no_grad():
            return score_texts(rm, rm_tokenizer, texts).tolist()

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    eos = tokenizer.eos_token_id
    config = GRPOConfig(
        output_dir=os.path.join(work, "trl"), seed=a.seed, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=PROMPTS * GENERATIONS,
        gradient_accumulation_steps=1, num_generations=GENERATIONS, steps_per_generation=1, num_iterations=1,
        max_completion_length=a.length, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": a.length, "suppress_tokens": [eos]}, beta=KL, epsilon=CLIP,
        scale_rewards="group", loss_type="dapo", disable_dropout=True, gradient_checkpointing=False, bf16=False,
        max_steps=a.warmup + a.steps, logging_steps=1, save_strategy="no", report_to=[], shuffle_dataset=False,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, log_completions=False)
    clock = Clock()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora_config(ModelArguments(**LORA), "CAUSAL_LM"),
                          callbacks=[clock])
    trainer.train()
    times = [b - e for e, b in zip(clock.marks, clock.marks[1:])]
    scores = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "reward" in h]
    return {"step_s": times[a.warmup:], "scores": scores, "lengths": lengths}


def scoring_check(a) -> dict:
    """The reward model's accuracy on held-out preference pairs (data/evaluation) when it scores our text
    (``score_texts``: its tokenizer's BOS, the text, EOS appended, as RewardTrainer trained it) and when it scores
    the text TRL's GRPOTrainer builds for a reward *model* (``prompt + completion`` tokenized with
    ``add_special_tokens=False``: no BOS, no EOS, no truncation), and how much the two scores agree."""
    import torch

    from common.layouts import load_pairs
    from common.modeling import ModelArguments, load_model, load_tokenizer
    from common.reward import score_texts

    tok = load_tokenizer(a.reward_model, False, "right")
    rm = load_model(ModelArguments(model_name_or_path=a.reward_model, dtype="float32", use_peft=False), "SEQ_CLS",
                    False, tok.pad_token_id).eval()
    rows, _ = load_pairs(".", "data/evaluation", "train", a.pairs)  # prompts: `Question: ...\n\nAnswer: `

    @torch.no_grad()
    def trl_way(texts):
        out = []
        for i in range(0, len(texts), 16):
            batch = tok(text=texts[i:i + 16], return_tensors="pt", padding=True, padding_side="right",
                        add_special_tokens=False)
            out.append(rm(**batch).logits[:, 0].float())
        return torch.cat(out)

    result = {"pairs": len(rows)}
    for name, score in (("ours", lambda p, r: score_texts(rm, tok, [x + y for x, y in zip(p, r)])),
                        ("trl", lambda p, r: trl_way([x + y for x, y in zip(p, r)]))):
        j, k = score(rows["prompt"], rows["chosen"]), score(rows["prompt"], rows["rejected"])
        result[name] = {"accuracy": (j > k).float().mean().item(), "scores": torch.cat([j, k])}
    x, y = result["ours"].pop("scores"), result["trl"].pop("scores")
    result["pearson"] = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    result["mean_abs_difference"] = (x - y).abs().mean().item()
    result["score_std_ours"] = x.std().item()
    return result


def side(a) -> None:
    with tempfile.TemporaryDirectory() as work:
        result = (run_ours if a.side == "ours" else run_trl)(a, work)
    result.update(side=a.side, peak_rss_bytes=vmhwm_bytes())
    print(json.dumps(result))


def drive(a) -> dict:
    runs = {"ours": [], "trl": []}
    for r in range(a.rounds):
        for name in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            cmd = [sys.executable, os.path.abspath(__file__), "--side", name, "--model", a.model, "--reward_model",
                   a.reward_model, "--steps", str(a.steps), "--warmup", str(a.warmup), "--length", str(a.length),
                   "--seed", str(a.seed)]
            print(f"round {r + 1}: {name}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"error: side {name} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {"setup": {"prompts_per_step": PROMPTS, "generations": GENERATIONS, "answer_tokens": a.length,
                     "timed_steps": a.steps, "warmup_steps": a.warmup, "rounds": a.rounds, "model": a.model,
                     "reward_model": a.reward_model}, "runs": runs}
    for name, rs in runs.items():
        steps = [t for r in rs for t in r["step_s"]]
        out[name] = {"median_step_s": statistics.median(steps),
                     "episodes_per_s": PROMPTS * GENERATIONS / statistics.median(steps),
                     "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs)}
    out["trl_over_ours_step_time"] = out["trl"]["median_step_s"] / out["ours"]["median_step_s"]
    out["trl_over_ours_peak_memory"] = out["trl"]["peak_rss_bytes"] / out["ours"]["peak_rss_bytes"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["ours", "trl"], default=None, help="run one side and print its JSON line")
    p.add_argument("--model", default="runs/pipeline/sft_merged")
    p.add_argument("--reward_model", default="runs/pipeline/rm")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--length", type=int, default=32, help="answer tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--scoring_check", action="store_true",
                   help="only compare the reward model's held-out pair accuracy on our text and on TRL's")
    p.add_argument("--pairs", type=int, default=0, help="--scoring_check on the first N held-out pairs (0: all)")
    a = p.parse_args(argv)
    for flag in ("model", "reward_model"):
        if not os.path.isfile(os.path.join(getattr(a, flag), "config.json")):
            p.error(f"--{flag} {getattr(a, flag)}: no config.json; run `bash scripts/run_pipeline.sh` first")
    if a.scoring_check:
        r = scoring_check(a)
        print(json.dumps(r))
        print(f"reward model accuracy on {r['pairs']} held-out pairs: our text {r['ours']['accuracy']:.3f}, TRL's "
              f"{r['trl']['accuracy']:.3f}; scores' correlation {r['pearson']:.3f}, mean |difference| "
              f"{r['mean_abs_difference']:.3f} (score std {r['score_std_ours']:.3f})")
        return
    if a.side:
        side(a)
        return
    out = drive(a)
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print("| side | median step (s) | episodes/s | peak memory (GiB) |\n| --- | --- | --- | --- |")
    for name in ("ours", "trl"):
        print(f"| {name} | {out[name]['median_step_s']:.3f} | {out[name]['episodes_per_s']:.2f} | "
              f"{out[name]['peak_rss_bytes'] / 2**30:.2f} |")
    print(f"TRL / ours: step time {out['trl_over_ours_step_time']:.2f}x, peak memory "
          f"{out['trl_over_ours_peak_memory']:.2f}x")


if __name__ == "__main__":
    main()
