r"""Compare models on held-out prompts: reward-model score, gold score, win rates, KL, answer length, best-of-n.

    # the pipeline's models on 200 held-out questions of the sample data
    python evaluate.py --models sft=runs/pipeline/sft_merged final=runs/pipeline/final \
        --reward_model_name runs/pipeline/rm_merged --output_dir runs/eval

    # from Python: the same run (output folder written), the results returned
    from evaluate import run_evaluate
    ev = run_evaluate(models={"sft": "runs/sft_merged", "final": "runs/final"}, reward_model_name="runs/rm_merged",
                      output_dir="runs/eval")
    ev.metrics["final"]["win_rate_gold"], ev.results["rows"][0]   # figures per model; everything in eval.json

    # the figures only, nothing written
    from evaluate import evaluate_models
    results = evaluate_models(models=["sft=runs/sft_merged", "final=runs/final"], reward_model_name="runs/rm_merged")

Every model answers the same prompts (``format_prompt(question)``; other prompt layouts, a `prompt` string or
conversation, as common/layouts.py reads them), one sampled answer each, from its own
distribution (common/generation.py: only our sampling settings). Each chunk of ``--batch_size`` prompts is sampled
under a seed fixed by ``--seed`` and the chunk's position alone, so a model's answers do not depend on which other
models are evaluated, and two copies of one model give the same answers (common random numbers: differences
between models are less noisy). Per model (docs/design.md, "Evaluation and the gold judge"):

- the reward model's score of ``format_example(question, answer)`` (its own tokenizer, ``render_answer``; the proxy
  PPO optimises);
- the gold score (common/gold.py, never used in training) on the questions that have an answer key: the row's
  ``answer_key`` field, else the sample data's key of the same question;
- mean answer length in tokens (up to and including EOS, as PPO's ``response/length_mean``), the share of answers
  that ended with EOS, and the readable share (common.gold.readable_share: words of the sample data's vocabulary);
- against the baseline (``--baseline``, default the first model): the paired difference of both scores and the
  win rate under both judges (ties 1/2; identical answers tie), and the gold win-rate ceiling (``common.gold.ceiling``:
  what answers with the whole fix and nothing wrong, but only the baseline's names, would win against it);
- the KL to the reference (``--reference``, default the baseline): the mean over prompts of
  ``sum_t logp_model(a_t) - logp_ref(a_t)`` on the model's own answers, at the sampling temperature, through each
  model's own output path (as PPO's ``objective/kl``); not computed when the two tokenizers differ.

Means, differences and win rates come with 95% paired bootstrap intervals over prompts (common/stats.py), and a
verdict ("rose", "fell", "better", "worse") only where the interval excludes no change.

Best of n (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): ``--best_of_n`` answers per prompt
import common.quiet  # noqa: F401  (first: silences known library messages)
from one model on ``--best_of_n_prompts`` prompts, sampled once; for n = 1, 2, 4, ... the reward model picks the
best of the first n, and the curve shows the proxy and the gold score of that pick. The proxy can only rise with n;
gold rising then falling is the reward model being over-optimised. ``kl_bound`` is the KL of best-of-n sampling
to the model, log n - (n - 1) / n (Stiennon et al. 2020, appendix G.3).

Output folder: ``eval.json`` (every figure and every answer), ``eval.md`` (tables and a few answers side by side),
``models.png`` and ``best_of_n.png``, ``run_args.yaml`` and a ``README.md`` card. The reference model stays loaded
next to the model being evaluated and the reward model (three models in memory at most).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm  # a widget in Jupyter, a text bar in a terminal

from common import stats
from common.cli import StageResult, UserError, call_stage, collect, parse_args, run
from common.data import DataError
from common.fields import data_dir_field, dataset_name_field, overwrite_output_dir_field, split_field
from common.generation import eos_token_ids, sample_responses
from common.gold import ceiling, judge, load_answer_keys, readable_share, vocabulary
from common.layouts import columns_field, load_normalized
from common.modeling import ModelArguments, check_model_path, check_vocabulary, load_model, load_tokenizer
from common.outputs import check_writable, holds_final_model, write_model_card, write_run_args, writing
from common.ppo_math import position_ids_for, response_logprobs
from common.prompts import encode, render_answer, render_prompt
from common.reward import score_texts

MAIN_STREAM, BEST_OF_N_STREAM = 0, 1  # seed streams: the answers compared, the best-of-n samples


@dataclass
class EvalArguments:
    """Which models, which prompts, how to sample, and where the results go."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Models to compare, as NAME=PATH (or PATH: named after its last folder). A PATH is a Hub "
                          "id, a model folder or a LoRA adapter folder (merged in memory on its base)."})
    reward_model_name: str | None = field(
        default=None, metadata={"help": "Reward model: Hub id, folder, or SEQ_CLS adapter folder."})
    reward_tokenizer_name: str | None = field(
        default=None, metadata={"help": "Reward model's tokenizer (default: its own)."})
    dataset_name: str = dataset_name_field(".", reads="The prompts")
    subset: str = data_dir_field("data/evaluation", "the prompts")
    split: str = split_field("the prompts")
    columns: list[str] | None = columns_field()
    num_prompts: int = field(default=200, metadata={"help": "Evaluate on the first N questions of the split."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest answer, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also of the KL's log-probs)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation, scoring and log-prob batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling and of the bootstrap."})
    baseline: str | None = field(
        default=None, metadata={"help": "NAME of the model the others are compared with (default: the first)."})
    reference: str | None = field(default=None, metadata={"help": "NAME of the KL reference (default: the baseline)."})
    best_of_n: int = field(default=32, metadata={"help": "Largest n of the best-of-n curve (0: no curve)."})
    best_of_n_model: str | None = field(
        default=None, metadata={"help": "NAME of the model the curve samples (default: the baseline)."})
    best_of_n_prompts: int = field(default=64, metadata={"help": "Prompts of the best-of-n curve (the first N)."})
    num_examples: int = field(default=3, metadata={"help": "Questions shown with every model's answer in eval.md."})
    bootstrap_resamples: int = field(
        default=stats.RESAMPLES, metadata={"help": "Bootstrap resamples of each interval."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Output folder."})
    overwrite_output_dir: bool = overwrite_output_dir_field("the results")
    dtype: str | None = field(
        default=None, metadata={"help": "Weights dtype (default: float32 on CPU, bfloat16 on GPUs that support it).",
                                "choices": ["auto", "bfloat16", "float16", "float32", None]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


def parse_models(spec) -> dict[str, str]:
    """``["sft=runs/sft", "runs/final"]`` (or a mapping, from YAML) -> ``{"sft": "runs/sft", "final": "runs/final"}``
    (NAME=PATH, or a plain PATH named after its last folder)."""
    if isinstance(spec, dict):
        pairs = [(str(k), str(v)) for k, v in spec.items()]
    else:
        pairs = []
        for item in [spec] if isinstance(spec, str) else spec:
            name, eq, path = str(item).partition("=")
            if not eq or "/" in name:  # a plain path (a Hub id has a slash, a name never does)
                name, path = os.path.basename(os.path.normpath(str(item))), str(item)
            pairs.append((name, path))
    models, problems = {}, []
    for name, path in pairs:
        if not re.fullmatch(r"[\w.+-]+", name) or not path:
            problems.append(f"--models {name}={path}: give NAME=PATH with a NAME of letters, digits, . _ + -")
        elif name in models:
            problems.append(f"--models: the name {name!r} is given twice; name them as NAME=PATH")
        else:
            models[name] = path
    collect(problems)
    return models


def check_args(args: EvalArguments) -> dict[str, str]:
    """Every problem with the flags at once; returns the models by name."""
    models = parse_models(args.models)
    problems = [] if models else ["--models is required (NAME=PATH ...)"]
    if not args.reward_model_name:
        problems.append("--reward_model_name is required")
    for flag in ("num_prompts", "max_new_tokens", "batch_size", "best_of_n_prompts", "bootstrap_resamples"):
        if getattr(args, flag) <= 0:
            problems.append(f"--{flag} must be > 0, got {getattr(args, flag)}")
    for flag in ("best_of_n", "num_examples"):
        if getattr(args, flag) < 0:
            problems.append(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    for flag in ("baseline", "reference", "best_of_n_model"):
        if getattr(args, flag) is not None and models and getattr(args, flag) not in models:
            problems.append(f"--{flag} {getattr(args, flag)} is not one of the --models names: {', '.join(models)}")
    collect(problems)
    for name, path in models.items():
        try:
            check_model_path(path, "--models")
        except UserError as e:
            raise UserError(f"model {name}: {e}") from None
    check_model_path(args.reward_model_name, "--reward_model_name")
    return models


def check_output_dir(args: EvalArguments) -> None:
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is a file, not a folder: choose another path")
    if holds_final_model(out):
        raise UserError(f"--output_dir {out} holds a model; the evaluation writes a README.md that would replace its "
                        "card: choose another folder")
    if os.path.isfile(os.path.join(out, "eval.json")) and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {out} already holds eval.json; pass --overwrite_output_dir to replace it")


# ------------------------------------------------------------------------------------------ inputs


def load_questions(args: EvalArguments) -> tuple[list[dict], str]:
    """The first ``--num_prompts`` prompts (any prompt layout, common/layouts.py), each with its readable question and
    answer key or None, and where they come from."""
    loaded, layout = load_normalized("prompts", args.dataset_name, args.subset, args.split, args.columns)
    ds = loaded.dataset.select(range(min(args.num_prompts, len(loaded.dataset))))
    own = ds["answer_key"] if "answer_key" in ds.column_names else [None] * len(ds)
    try:
        sample_keys = load_answer_keys()
    except (OSError, ValueError):  # a checkout without the sample data
        sample_keys = {}
    rows, problems = [], []
    for i, (prompt, question, key) in enumerate(zip(ds["prompt"], ds["question"], own)):
        if key is not None and not (isinstance(key, dict) and key.get("fix")):
            problems.append(f"{loaded.where(i)}: field 'answer_key' is not an answer key (a mapping with a 'fix' list)")
        rows.append({"prompt": prompt, "question": question,
                     "answer_key": key if key is not None else sample_keys.get(question)})
    if problems:
        raise DataError(f"{len(problems)} invalid answer key{'s' if len(problems) > 1 else ''} in {loaded.source}:\n  "
                        + "\n  ".join(problems[:10]))
    return rows, f"{loaded.source}, {layout.describe()}"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(path: str, args: EvalArguments):
    """A model to evaluate and its own tokenizer (left padding, for batched generation)."""
    tokenizer = load_tokenizer(path, args.trust_remote_code, "left")
    lm = load_model(ModelArguments(model_name_or_path=path, dtype=args.dtype, use_peft=False), "CAUSAL_LM",
                    args.trust_remote_code, tokenizer.pad_token_id, flag="--models")
    check_vocabulary(tokenizer, lm, path, path, "--models", model_flag="--models")
    return tokenizer, lm.eval().requires_grad_(False).to(device())


def load_reward_model(args: EvalArguments):
    source = args.reward_tokenizer_name or args.reward_model_name
    tokenizer = load_tokenizer(source, args.trust_remote_code, "right")
    rm_args = ModelArguments(model_name_or_path=args.reward_model_name, dtype=args.dtype, use_peft=False)
    rm = load_model(rm_args, "SEQ_CLS", args.trust_remote_code, tokenizer.pad_token_id, flag="--reward_model_name",
                    require_score_head=True)
    check_vocabulary(tokenizer, rm, source, args.reward_model_name, "--reward_tokenizer_name",
                     model_flag="--reward_model_name")
    return tokenizer, rm.eval().requires_grad_(False).to(device())


# ------------------------------------------------------------------------------------------ sampling and scoring


def chunk_seed(seed: int, stream: int, chunk: int) -> int:
    """The sampling seed of one chunk of prompts: from the run's seed, the stream and the chunk's position only."""
    return ((seed * 1_000_003 + stream) * 1_000_003 + chunk) % 2**63


def sample(lm, tokenizer, prompts: list[list[int]], args: EvalArguments, stream: int, *, desc: str) -> list[list[int]]:
    """One answer per prompt (token ids up to and including the first EOS), ``--batch_size`` prompts at a time,
    each chunk under its own seed."""
    eos, answers = eos_token_ids(tokenizer, lm), []
    starts = range(0, len(prompts), args.batch_size)
    for i, start in enumerate(tqdm(starts, desc=desc, disable=args.disable_tqdm, leave=False)):
        torch.manual_seed(chunk_seed(args.seed, stream, i))
        answers += sample_responses(lm, prompts[start : start + args.batch_size], args.max_new_tokens,
                                    args.temperature, eos, pad_id=tokenizer.pad_token_id)
    return answers


@torch.no_grad()
def sequence_logprobs(lm, prompts: list[list[int]], answers: list[list[int]], pad_id: int, temperature: float,
                      *, batch_size: int) -> list[float]:
    """``sum_t log p(a_t | prompt, a_<t)`` of each answer under ``lm`` at ``temperature``, through the model's own
    forward (``logits_to_keep``: only the answer's logits), laid out as PPO lays out a batch: left-padded prompt,
    right-padded answer, positions counted over real tokens."""
    sums = []
    for s in range(0, len(prompts), batch_size):
        qs, rs = prompts[s : s + batch_size], answers[s : s + batch_size]
        P, R = max(map(len, qs)), max(map(len, rs))
        ids = [[pad_id] * (P - len(q)) + q + r + [pad_id] * (R - len(r)) for q, r in zip(qs, rs)]
        attn = [[0] * (P - len(q)) + [1] * (len(q) + len(r)) + [0] * (R - len(r)) for q, r in zip(qs, rs)]
        ids, attn = torch.tensor(ids, device=lm.device), torch.tensor(attn, device=lm.device)
        logits = lm(input_ids=ids, attention_mask=attn, position_ids=position_ids_for(attn), use_cache=False,
                    logits_to_keep=R + 1).logits
        logprobs = response_logprobs(logits, ids[:, P:], temperature)
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (R - len(r)) for r in rs], device=lm.device)
        sums += (logprobs * mask).sum(1).double().tolist()
    return sums


def reward_scores(rm, rm_tokenizer, prompts: list, answers: list[str], batch_size: int, *, what: str) -> list[float]:
    """The reward model's score of each prompt answered (``common.prompts.render_answer``, its own tokenizer)."""
    scores = score_texts(rm, rm_tokenizer, [render_answer(rm_tokenizer, p, t) for p, t in zip(prompts, answers)],
                         batch_size)
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise UserError(f"the reward model gave non-finite scores to {bad} answers of {what}")
    return scores.double().tolist()


def gold_verdicts(rows: list[dict], answers: list[str]) -> list:
    """The gold judge's verdict on each answer to its row's question (common/gold.py); None where the row has no
    key."""
    return [judge(r["question"], t, r["answer_key"]) if r["answer_key"] else None for r, t in zip(rows, answers)]


def gold_scores(rows: list[dict], answers: list[str]) -> list[float | None]:
    """The gold score of each answer to its row's question; None where the row has no key."""
    return [v.score if v is not None else None for v in gold_verdicts(rows, answers)]


GOLD_PARTS = ("fix", "names", "broken", "code", "eos")  # what the gold score is made of, per model (``gold_parts``)


def gold_parts(verdicts: list, ended: list[bool], args: "EvalArguments") -> dict | None:
    """The parts of the gold score, each a mean with its interval over the questions with a key: ``fix`` and
    ``names`` (the judge's shares in [0, 1]), ``broken`` (share of answers with a marker of a broken fix),
    ``code`` (share with a non-empty code block) and ``eos`` (share that ended with EOS within the budget)."""
    keyed = [(v, e) for v, e in zip(verdicts, ended) if v is not None]
    if not keyed:
        return None
    parts = {"fix": [v.fix for v, _ in keyed], "names": [v.names for v, _ in keyed],
             "broken": [float(bool(v.forbidden)) for v, _ in keyed], "code": [float(v.has_code) for v, _ in keyed],
             "eos": [float(e) for _, e in keyed]}
    return {k: interval(parts[k], args) for k in GOLD_PARTS}


def same_tokenizer(t1, t2) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    return t1.get_vocab() == t2.get_vocab() and t1.all_special_ids == t2.all_special_ids


def answer_model(name: str, lm, tokenizer, rows: list[dict], args: EvalArguments, *, rm, rm_tokenizer, vocab) -> dict:
    """A model's answers to every prompt, with their scores, length and own log-probs (for the KL)."""
    prompts = [encode(tokenizer, render_prompt(tokenizer, r["prompt"])) for r in rows]
    ids = sample(lm, tokenizer, prompts, args, MAIN_STREAM, desc=f"{name}: sampling")
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    eos = eos_token_ids(tokenizer, lm)
    verdicts = gold_verdicts(rows, texts)
    return {
        "prompts": prompts, "ids": ids, "texts": texts,
        "tokens": [len(r) for r in ids], "ended": [bool(r) and r[-1] in eos for r in ids],
        "reward": reward_scores(rm, rm_tokenizer, [r["prompt"] for r in rows], texts, args.batch_size,
                                what=f"model {name}"),
        "gold": [v.score if v is not None else None for v in verdicts], "verdicts": verdicts,
        "readable": [readable_share(t, vocab) for t in texts],
        "logp": sequence_logprobs(lm, prompts, ids, tokenizer.pad_token_id, args.temperature,
                                  batch_size=args.batch_size),
    }


def best_of_n_curve(name: str, lm, tokenizer, rows: list[dict], args: EvalArguments, *, rm, rm_tokenizer) -> dict:
    """``--best_of_n`` answers per prompt sampled once; for each n the proxy and gold score of the reward model's
    pick among the first n (the first of equal scores)."""
    rows, n_max = rows[: args.best_of_n_prompts], args.best_of_n
    prompts = [encode(tokenizer, render_prompt(tokenizer, r["prompt"])) for r in rows for _ in range(n_max)]
    ids = sample(lm, tokenizer, prompts, args, BEST_OF_N_STREAM, desc=f"{name}: best of {n_max}")
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    repeated = [r["prompt"] for r in rows for _ in range(n_max)]
    flat = reward_scores(rm, rm_tokenizer, repeated, texts, args.batch_size, what=f"model {name} (best of n)")
    per_prompt = []
    for i, row in enumerate(rows):
        answers, reward = texts[i * n_max : (i + 1) * n_max], flat[i * n_max : (i + 1) * n_max]
        gold = gold_scores([row] * n_max, answers) if row["answer_key"] else None
        per_prompt.append({"question": row["question"], "answers": answers, "reward": reward, "gold": gold})
    ns = [2**k for k in range(int(math.log2(n_max)) + 1)]
    ns += [n_max] if ns[-1] != n_max else []
    keyed = [p for p in per_prompt if p["gold"] is not None]
    curve, picks = [], {}
    for n in ns:
        pick = [max(range(n), key=lambda j, p=p: (p["reward"][j], -j)) for p in per_prompt]  # first of the maxima
        picks[n] = ([p["reward"][j] for p, j in zip(per_prompt, pick)],
                    [p["gold"][j] for p, j in zip(per_prompt, pick) if p["gold"] is not None])
        curve.append({"n": n, "reward": interval(picks[n][0], args),
                      "gold": interval(picks[n][1], args) if keyed else None, "kl_bound": math.log(n) - (n - 1) / n})
    return {
        "model": name, "prompts": len(rows), "with_answer_key": len(keyed), "n_max": n_max, "curve": curve,
        "reward_change": difference(picks[n_max][0], picks[1][0], args),
        "gold_change": difference(picks[n_max][1], picks[1][1], args) if keyed else None,
        "rows": per_prompt,
    }


# ------------------------------------------------------------------------------------------ figures


def interval(values: list[float], args: EvalArguments) -> dict:
    return stats.bootstrap_mean(values, args.bootstrap_resamples, args.seed).as_dict()


def difference(x: list[float], y: list[float], args: EvalArguments) -> dict:
    d = stats.paired_difference(x, y, args.bootstrap_resamples, args.seed)
    return {**d.as_dict(), "verdict": stats.verdict(d)}


def win(x: list[float], y: list[float], same: list[bool], args: EvalArguments) -> dict:
    w = stats.win_rate(x, y, same, args.bootstrap_resamples, args.seed)
    v = stats.verdict(w, null=0.5)
    return {**w.as_dict(), "verdict": {stats.ROSE: "better", stats.FELL: "worse"}.get(v, v)}


def _ceiling_win(base: dict, keyed: list[int], args: EvalArguments) -> dict | None:
    """The win rate against the baseline's answers of the best answers with their names (``gold.ceiling``)."""
    verdicts = [base["verdicts"][i] for i in keyed]
    if not verdicts or any(v is None for v in verdicts):
        return None
    return win([ceiling(v) for v in verdicts], [v.score for v in verdicts], [False] * len(verdicts), args)


def summarize(answered: dict, base: dict, args: EvalArguments) -> dict:
    """A model's figures with intervals, and its comparison with the baseline, over the same prompts."""
    keyed = [i for i, g in enumerate(answered["gold"]) if g is not None]
    same = [t == u for t, u in zip(answered["texts"], base["texts"])]
    gold = [answered["gold"][i] for i in keyed]
    base_gold = [base["gold"][i] for i in keyed]
    return {
        "reward": interval(answered["reward"], args),
        "gold": interval(gold, args) if keyed else None,
        "gold_parts": gold_parts(answered["verdicts"], answered["ended"], args),
        "length": interval(answered["tokens"], args),
        "readable_share": interval(answered["readable"], args),
        "eos_fraction": sum(answered["ended"]) / len(answered["ended"]),
        "kl": interval(answered["kl"], args) if answered["kl"] is not None else None,
        "kl_note": answered["kl_note"],
        "vs_baseline": {
            "reward_difference": difference(answered["reward"], base["reward"], args),
            "gold_difference": difference(gold, base_gold, args) if keyed else None,
            "win_rate_reward": win(answered["reward"], base["reward"], same, args),
            "win_rate_gold": win(gold, base_gold, [same[i] for i in keyed], args) if keyed else None,
            # The most a policy writing the baseline's share of the question's names could win (gold.ceiling).
            "win_rate_gold_ceiling": _ceiling_win(base, keyed, args),
            "length_difference": difference(answered["tokens"], base["tokens"], args),
            "readable_share_difference": difference(answered["readable"], base["readable"], args),
        },
    }


def evaluate_models(args: EvalArguments | None = None, **kwargs) -> dict:
    """Sample, score and compare (see the module docstring); ``args`` or the same fields as keywords (``models``
    may be a list of ``NAME=PATH`` or a dict). Returns the results dict that ``eval.json`` holds; writes nothing."""
    args = dataclasses.replace(args, **kwargs) if args is not None else EvalArguments(**kwargs)
    models = check_args(args)
    rows, source = load_questions(args)
    print(f"prompts: {len(rows)} from {source}", flush=True)
    baseline = args.baseline or next(iter(models))
    reference, bon_model = args.reference or baseline, args.best_of_n_model or baseline
    rm_tokenizer, rm = load_reward_model(args)
    vocab = vocabulary()
    answered, bon, ref = {}, None, None
    for name in [reference] + [n for n in models if n != reference]:  # the reference first; it stays loaded
        tokenizer, lm = load_causal_lm(models[name], args)
        m = answered[name] = answer_model(name, lm, tokenizer, rows, args, rm=rm, rm_tokenizer=rm_tokenizer,
                                          vocab=vocab)
        if ref is None:
            ref = (tokenizer, lm)
            m["kl"], m["kl_note"] = [0.0] * len(rows), None  # logp - logp of the same forward: exactly 0
        elif same_tokenizer(tokenizer, ref[0]):
            ref_logp = sequence_logprobs(ref[1], m["prompts"], m["ids"], ref[0].pad_token_id, args.temperature,
                                         batch_size=args.batch_size)
            m["kl"], m["kl_note"] = [x - y for x, y in zip(m["logp"], ref_logp)], None
        else:
            m["kl"], m["kl_note"] = None, (f"not computed: the tokenizers of {name} and the reference {reference} "
                                           "differ (the KL sums over the model's tokens; the reference must read them)")
        if args.best_of_n and name == bon_model:
            bon = best_of_n_curve(name, lm, tokenizer, rows, args, rm=rm, rm_tokenizer=rm_tokenizer)
        if lm is not ref[1]:
            del lm  # freed before the next model loads: at most the reference, this model and the reward model
    base = answered[baseline]
    keyed = sum(r["answer_key"] is not None for r in rows)
    notes = [] if keyed else ["no question has an answer key: no gold scores (gold needs the sample data's questions)"]
    if len(rows) < args.num_prompts:
        notes.append(f"{source} has {len(rows)} questions, fewer than --num_prompts {args.num_prompts}: all were used")
    notes += [f"KL of {name}: {m['kl_note']}" for name, m in answered.items() if m["kl_note"]]
    return {
        "settings": {"models": models, "baseline": baseline, "reference": reference,
                     "best_of_n_model": bon_model if args.best_of_n else None,
                     **{k: v for k, v in dataclasses.asdict(args).items()
                        if k not in ("models", "baseline", "reference", "best_of_n_model")}},
        "prompts": {"source": source, "n": len(rows), "with_answer_key": keyed},
        "models": {name: {"path": models[name], **summarize(answered[name], base, args)} for name in models},
        "best_of_n": bon,
        "rows": [{"question": r["question"], "has_answer_key": r["answer_key"] is not None,
                  "answers": {name: {"answer": m["texts"][i], "tokens": m["tokens"][i], "ended": m["ended"][i],
                                     "reward": m["reward"][i], "gold": m["gold"][i], "readable_share": m["readable"][i],
                                     "kl": m["kl"][i] if m["kl"] is not None else None}
                              for name, m in ((n, answered[n]) for n in models)}}
                 for i, r in enumerate(rows)],
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ writing


def _ci(d: dict | None, digits: int = 3) -> str:
    if d is None:
        return "n/a"
    if d["low"] is None:
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>").strip() or "(empty)"


def write_markdown(results: dict, path: str) -> None:
    s, p = results["settings"], results["prompts"]
    lines = ["# Evaluation", "",
             f"{p['n']} prompts from {p['source']} (the first rows); one answer per prompt and model, sampled at "
             f"temperature {s['temperature']}, at most {s['max_new_tokens']} new tokens, seed {s['seed']}. Gold scores "
             f"on the {p['with_answer_key']} questions with an answer key. Means with 95% bootstrap intervals over "
             f"prompts ({s['bootstrap_resamples']} resamples). Reward model: `{s['reward_model_name']}`.", "",
             f"## Models (KL to `{s['reference']}`)", "",
             "| model | path | RM score | gold | length (tokens) | ended with EOS | readable share | KL to reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in results["models"].items():
        kl = _ci(m["kl"]) if m["kl"] is not None else "n/a (tokenizers differ)"
        lines.append(f"| {name} | `{m['path']}` | {_ci(m['reward'])} | {_ci(m['gold'])} | {_ci(m['length'], 1)} | "
                     f"{m['eos_fraction']:.2f} | {_ci(m['readable_share'])} | {kl} |")
    lines += ["", f"## Against the baseline `{s['baseline']}` (paired, same prompts)", "",
              "Win rates count ties 1/2; a verdict is given only where the interval excludes no change "
              "(0 for a difference, 0.5 for a win rate).", "",
              "| model | RM score difference | verdict | gold difference | verdict | win rate (RM) | verdict "
              "| win rate (gold) | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in results["models"].items():
        v = m["vs_baseline"]
        cells = [f"{_ci(v[k])} | {v[k]['verdict']}" if v[k] else "n/a | " for k in
                 ("reward_difference", "gold_difference", "win_rate_reward", "win_rate_gold")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(m.get("gold_parts") for m in results["models"].values()):
        lines += ["", "## What the gold score is made of", "",
                  "Means over the questions with a key: the share of the right fix's terms in the code (`fix`) and "
                  "of the question's names (`names`), the share of answers with a marker of a broken fix "
                  "(`broken`, lower is better), with a code block (`code`) and ended with EOS (`eos`).", "",
                  "| model | " + " | ".join(GOLD_PARTS) + " |", "| --- |" + " --- |" * len(GOLD_PARTS)]
        lines += [f"| {name} | " + " | ".join(_ci(m["gold_parts"][k]) for k in GOLD_PARTS) + " |"
                  for name, m in results["models"].items() if m.get("gold_parts")]
        top = results["models"][s["baseline"]]["vs_baseline"].get("win_rate_gold_ceiling")  # the same for every model
        if top:
            lines += ["", f"Gold win-rate ceiling: an answer with the whole fix and nothing wrong, but no more of the "
                      f"question's names than `{s['baseline']}`'s, would beat `{s['baseline']}` in {_ci(top)} of the "
                      "questions (ties 1/2); a model that cannot copy names cannot win more."]
    lines += ["", "| model | length difference (tokens) | verdict | readable share difference | verdict |",
              "| --- | --- | --- | --- | --- |"]
    for name, m in results["models"].items():
        v = m["vs_baseline"]
        lines.append(f"| {name} | {_ci(v['length_difference'], 1)} | {v['length_difference']['verdict']} | "
                     f"{_ci(v['readable_share_difference'])} | {v['readable_share_difference']['verdict']} |")
    bon = results["best_of_n"]
    if bon:
        lines += ["", f"## Best of n: `{bon['model']}`, {bon['prompts']} prompts ({bon['with_answer_key']} with a key)",
                  "", "The reward model's pick among the first n answers. The proxy cannot fall with n; gold falling "
                  "while the proxy rises is over-optimisation of the reward model (Gao et al. 2022).", "",
                  "| n | RM score of the pick | gold of the pick | KL bound (nats) |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['n']} | {_ci(c['reward'])} | {_ci(c['gold'])} | {c['kl_bound']:.3f} |" for c in bon["curve"]]
        lines += ["", f"From n = 1 to n = {bon['n_max']}: RM score {bon['reward_change']['verdict']} "
                  f"({_ci(bon['reward_change'])}), gold "
                  + (f"{bon['gold_change']['verdict']} ({_ci(bon['gold_change'])})." if bon["gold_change"] else "n/a.")]
    names = list(results["models"])
    lines += ["", "## Example answers", ""]
    for i, row in enumerate(results["rows"][: s["num_examples"]], 1):
        answers = row["answers"]
        lines += [f"### {i}. {row['question']}", "", "| " + " | ".join(names) + " |", "|" + " --- |" * len(names),
                  "| " + " | ".join(_cell(answers[n]["answer"]) for n in names) + " |",
                  "| " + " | ".join(f"RM {answers[n]['reward']:.3f}, gold "
                                    + (f"{answers[n]['gold']:.3f}" if answers[n]["gold"] is not None else "n/a")
                                    for n in names) + " |", ""]
    lines += [f"Note: {n}" for n in results["notes"]] + ([""] if results["notes"] else [])
    lines += ["## Plots", "", "![models](models.png)"] + (["", "![best of n](best_of_n.png)"] if bon else [])
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_plots(results: dict, output_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, key, title):
        names = [n for n, m in results["models"].items() if m[key] is not None]
        means = [results["models"][n][key]["mean"] for n in names]
        lows = [results["models"][n][key]["low"] for n in names]
        highs = [results["models"][n][key]["high"] for n in names]
        err = [[m - (lo if lo is not None else m) for m, lo in zip(means, lows)],
               [(hi if hi is not None else m) - m for m, hi in zip(means, highs)]]
        ax.bar(names, means, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)

    paths = [os.path.join(output_dir, "models.png")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    bars(axes[0], "reward", "reward-model score (proxy)")
    bars(axes[1], "gold", "gold score")
    axes[1].set_ylim(0, 1)  # gold is a score out of 1
    fig.suptitle(f"{results['prompts']['n']} prompts, means with 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    bon = results["best_of_n"]
    if bon:
        paths.append(os.path.join(output_dir, "best_of_n.png"))
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in ((axes[0], "reward", "reward-model score of the pick (proxy)"),
                               (axes[1], "gold", "gold score of the pick")):
            points = [c for c in bon["curve"] if c[key] is not None]
            x = [c["n"] for c in points]
            ax.plot(x, [c[key]["mean"] for c in points], marker="o", color="C0" if key == "reward" else "C1")
            if points and points[0][key]["low"] is not None:
                ax.fill_between(x, [c[key]["low"] for c in points], [c[key]["high"] for c in points], alpha=0.25,
                                color="C0" if key == "reward" else "C1")
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [str(n) for n in x])
            ax.set_xlabel("n (answers the reward model picks from)")
            ax.set_title(title)
        fig.suptitle(f"best of n: {bon['model']}, {bon['prompts']} prompts, 95% bootstrap intervals")
        fig.tight_layout()
        fig.savefig(paths[1], dpi=100)
        plt.close(fig)
    return paths


def write_results(results: dict, output_dir: str) -> None:
    """``eval.json``, ``eval.md``, the plots and the ``README.md`` card."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False, allow_nan=False)
    write_markdown(results, os.path.join(output_dir, "eval.md"))
    write_plots(results, output_dir)
    s = results["settings"]
    metrics = {}
    for name, m in results["models"].items():
        metrics[f"{name}: RM score"] = _ci(m["reward"])
        metrics[f"{name}: gold"] = _ci(m["gold"])
        metrics[f"{name}: win rate (gold) vs {s['baseline']}"] = _ci(m["vs_baseline"]["win_rate_gold"])
        metrics[f"{name}: KL to {s['reference']}"] = _ci(m["kl"])
    write_model_card(output_dir, "Evaluation", s["models"][s["baseline"]],
                     f"{s['dataset_name']} ({s['subset']}, {s['split']}), {results['prompts']['n']} prompts; reward "
                     f"model {s['reward_model_name']}", metrics,
                     notes="Tables and example answers: `eval.md`; every figure and answer: `eval.json`.",
                     logs_metrics=False)


def headline(results: dict) -> dict[str, dict]:
    """Per model, the means a next step compares: RM score, gold, length, KL to the reference, and the win rates
    against the baseline under both judges (None where not computed)."""
    mean = lambda d: d["mean"] if d else None  # noqa: E731
    return {name: {"reward": mean(m["reward"]), "gold": mean(m["gold"]), "length": mean(m["length"]),
                   "kl": mean(m["kl"]), "win_rate_reward": mean(m["vs_baseline"]["win_rate_reward"]),
                   "win_rate_gold": mean(m["vs_baseline"]["win_rate_gold"])}
            for name, m in results["models"].items()}


def main(args: EvalArguments) -> StageResult:
    check_args(args)
    check_output_dir(args)
    check_writable(args.output_dir, "--output_dir")
    results = evaluate_models(args)  # checks the data before any model loads
    with writing(f"the evaluation to {args.output_dir}"):
        write_run_args(args.output_dir, args)
        write_results(results, args.output_dir)
    baseline = results["settings"]["baseline"]
    for name, m in results["models"].items():
        w = m["vs_baseline"]["win_rate_gold"]
        print(f"{name}: RM score {_ci(m['reward'])}, gold {_ci(m['gold'])}, win rate (gold) vs {baseline} "
              f"{_ci(w)}{' ' + w['verdict'] if w else ''}")
    print(f"saved to {args.output_dir} (eval.md, eval.json)")
    return StageResult(args.output_dir, headline(results), results)


def parse(argv: list[str] | None = None, kwargs: dict | None = None) -> tuple[EvalArguments]:
    if kwargs is not None and isinstance(kwargs.get("models"), dict):  # {"sft": path, ...}, as the YAML takes it
        kwargs = {**kwargs, "models": [f"{name}={path}" for name, path in kwargs["models"].items()]}
    return parse_args((EvalArguments,), None, None, argv, __doc__, kwargs=kwargs)


def run_evaluate(**kwargs) -> StageResult:
    """The evaluation from Python, output folder written: the keyword arguments are the flags without their dashes,
    with the same defaults and checks; ``models`` is a list of ``NAME=PATH`` (or paths) or a dict of name to path.
    Returns the output folder, ``metrics`` (per model: RM score, gold, length, KL and the win rates against the
    baseline, as means) and ``results`` (everything ``eval.json`` holds); a mistake raises ``common.cli.UserError``.
    ``evaluate_models`` gives the results without writing anything."""
    return call_stage("evaluate.run_evaluate", parse, main, kwargs)


if __name__ == "__main__":
    run(lambda: main(*parse()))
