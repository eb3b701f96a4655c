"""Scoring text with a reward model (a one-label sequence classifier): used by the reward-model stage's
evaluation, by PPO, and by the pipeline's report."""

from __future__ import annotations

import torch


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], batch_size: int = 16,
                max_length: int | None = None) -> torch.Tensor:
    """Reward-model scores of ``texts`` (float32, on CPU, shape ``[len(texts)]``).

    Each text is tokenized with the reward model's own tokenizer (so policy and reward model need not share a
    vocabulary), ended with its EOS token as the reward-model stage ends every training text, batched with
    padding, and scored at its last non-pad token (``config.pad_token_id``).
    """
    from common.prompts import ends_with_eos

    eos = tokenizer.eos_token or ""
    texts = [t if ends_with_eos(tokenizer, t) else t + eos for t in texts]
    bos = tokenizer.bos_token
    # A chat template writes BOS itself; the tokenizer would add a second one (common.prompts.encode).
    special = not (bos and texts and all(t.startswith(bos) for t in texts))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=special,
            truncation=max_length is not None, max_length=max_length,
        ).to(device)
        scores.append(model(**batch).logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)
