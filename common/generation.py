"""Sampling answers from a causal LM exactly from its own distribution, as PPO's log-probs assume.

A model's ``generation_config`` may carry processors (repetition penalty, suppressed tokens, ``min_new_tokens``,
top-k/top-p defaults, forced tokens); ``generate`` applies them to every value the caller leaves unset. Samples
drawn through them come from another distribution than the one PPO computes log-probs and KL for, so every
sampling here runs with a generation config built from our arguments alone (``sampling``). Every end-of-sequence
id the model or tokenizer names (Llama-3 style lists included) ends an answer.
"""

from __future__ import annotations

import contextlib

import torch


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's (its ``generation_config`` and config may
    list several), in a fixed order without repeats."""
    sources = [tokenizer.eos_token_id]
    lm = getattr(model, "get_base_model", lambda: model)()
    generation_config = getattr(lm, "generation_config", None)
    if generation_config is not None:
        sources.append(generation_config.eos_token_id)
    sources.append(getattr(lm.config.get_text_config(), "eos_token_id", None))
    ids: list[int] = []
    for value in sources:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def sampling_config(max_new_tokens: int, temperature: float, eos_ids: list[int], pad_id: int,
                    with_scores: bool = False):
    """Pure sampling: ``top_k=0, top_p=1``, the temperature, stop at any EOS id; no other processor.
    ``with_scores``: ``generate`` also returns the processed scores each token was sampled from."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=temperature, max_new_tokens=max_new_tokens,
                            eos_token_id=list(eos_ids) or None, pad_token_id=pad_id, use_cache=True,
                            return_dict_in_generate=with_scores, output_scores=with_scores)


@contextlib.contextmanager
def only_this_generation_config(lm):
    """``generate`` fills every unset field of the config it is given from ``lm.generation_config``; with a blank
    one in its place for the duration, only the library's neutral defaults can fill them."""
    from transformers import GenerationConfig

    saved = lm.generation_config
    lm.generation_config = GenerationConfig()
    try:
        yield
    finally:
        lm.generation_config = saved


def cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """``tokens`` up to and including the first EOS id (all of them if none)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def sample_responses(lm, prompts: list[list[int]], max_new_tokens: int, temperature: float, eos_ids: list[int],
                     *, pad_id: int, return_logprobs: bool = False):
    """One sampled answer per prompt (token ids, cut after the first EOS), left-padded in one batch, KV cache on.

    ``lm`` is the causal LM (LoRA layers inside it stay active). With ``return_logprobs``, also the log-probability
    of each sampled token under the distribution it was sampled from (from ``generate``'s processed scores), for
    checks against a training forward.
    """
    device = next(lm.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = sampling_config(max_new_tokens, temperature, eos_ids, pad_id, with_scores=return_logprobs)
    with only_this_generation_config(lm):
        out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    sequences = out.sequences if return_logprobs else out
    responses = [cut_at_eos(row, eos_ids) for row in sequences[:, width:].tolist()]
    if not return_logprobs:
        return responses
    scores = torch.stack(out.scores, 1).float()  # [B, new tokens, V], after the processors: what was sampled from
    logprobs = torch.log_softmax(scores, -1).gather(-1, sequences[:, width:, None]).squeeze(-1)
    return responses, [lp[: len(r)].tolist() for lp, r in zip(logprobs, responses)]
