"""How much of the return can a critic explain? Monte Carlo values of a policy's own rollouts, and learned critics.

PPO logs ``val/explained_variance`` = 1 - Var(R - V) / Var(R) of its value head against the GAE returns R. This
script measures what a *perfect* critic would score, for a given policy and reward model at PPO's first step
(policy = reference, so the per-token KL rewards are zero and the return is the final score):

1. sample one answer per held-out prompt (``--max_new_tokens``, temperature 1, as PPO samples);
2. at every response position t, estimate the true value V(s_t) = E[score | prompt + answer[:t]] as the mean
   reward-model score of ``--continuations`` (K) answers completed from that prefix by the same policy;
3. GAE (``--lam`` 0.95, PPO's default): the returns of each answer with those values (``common.ppo_math.compute_gae``,
   gamma 1) and the explained variance of the values against them (``common.ppo_math.explained_variance``),
   by position and over all tokens, for K and for the first K / 2 completions (the values are means of K draws:
   their noise lowers the figure, the trend with K shows by how much);
4. Monte Carlo (lam 1, the return is the final score): ``1 - E[Var(G | prefix)] / Var(G)`` from the K completions
   of every prefix (each is a draw of the return from it), free of that noise.

With ``--critics N``, it then trains two critics by regression on the final scores of N more answers (``--epochs``
passes, AdamW ``--critic_learning_rate``, 16 answers a step) and reports their explained variance on held-out answers
against the final score, comparable with step 4: one initialised from the reward model (as InstructGPT's value
function), one from the policy's weights with a new score head.

    bash scripts/run_pipeline.sh     # runs/pipeline/sft_merged and runs/pipeline/rm
    python benchmarks/value_ceiling.py --model runs/pipeline/sft_merged --reward_model runs/pipeline/rm --critics 400

Results on the pipeline's models are in benchmarks/README.md ("Value head").
"""

from __future__ import annotations

import argparse

from _setup import ROOT  # first: the repository on sys.path, offline, passive OpenMP


def monte_carlo_values(policy, tokenizer, reward_model, reward_tokenizer, questions, *, max_new_tokens, k, eos_ids,
                       batch_size=256):
    """(answers, values, scores): one sampled answer per question; ``values[i]`` is ``[len(answers[i]), k]``, the
    final scores of ``k`` completions from each prefix ``answers[i][:t]``; ``scores[i]`` the answer's own score."""
    import torch

    from common.generation import sample_responses
    from common.prompts import format_example, tokenize_prompt
    from common.reward import score_texts

    prompts = [tokenize_prompt(tokenizer, q) for q in questions]
    pad = tokenizer.pad_token_id
    answers = sample_responses(policy, prompts, max_new_tokens, 1.0, eos_ids, pad_id=pad)

    def scores_of(rows, responses):
        texts = [format_example(questions[i], tokenizer.decode(r, skip_special_tokens=True))
                 for i, r in zip(rows, responses)]
        return score_texts(reward_model, reward_tokenizer, texts, 64)

    own = scores_of(range(len(questions)), answers)
    values = [torch.zeros(len(a), k) for a in answers]
    for t in range(max(map(len, answers))):
        rows = [i for i, a in enumerate(answers) if len(a) > t]  # answers end at their EOS: no prefix past it
        jobs = [(i, j) for i in rows for j in range(k)]
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s : s + batch_size]
            prefixes = [prompts[i] + answers[i][:t] for i, _ in chunk]
            tails = sample_responses(policy, prefixes, max_new_tokens - t, 1.0, eos_ids, pad_id=pad)
            got = scores_of([i for i, _ in chunk], [answers[i][:t] + tail for (i, _), tail in zip(chunk, tails)])
            for (i, j), g in zip(chunk, got.tolist()):
                values[i][t, j] = g
    return answers, values, own


def ceilings(values, scores, lam):
    """Explained variance of the given values (means over their columns) against the GAE returns they imply, over
    all tokens and by position bucket; the returns use each answer's own score as its final reward."""
    import torch

    from common.ppo_math import compute_gae, explained_variance

    n, width = len(values), max(len(v) for v in values)
    V = torch.zeros(n, width)
    mask = torch.zeros(n, width)
    rewards = torch.zeros(n, width)
    for i, v in enumerate(values):
        V[i, : len(v)] = v.mean(1)
        mask[i, : len(v)] = 1
        rewards[i, len(v) - 1] = scores[i]
    _, returns = compute_gae(rewards, V, mask, 1.0, lam)
    out = {"all": explained_variance(V, returns, mask)}
    pos = torch.arange(width).expand(n, width)
    for lo, hi, name in ((0, 8, "0-7"), (8, 16, "8-15"), (16, 32, "16-31"), (32, width, "32+")):
        sel = mask * ((pos >= lo) & (pos < hi)).float()
        out[name] = explained_variance(V, returns, sel)
    return out


def monte_carlo_ceiling(values):
    """Explained variance of the true values against the Monte Carlo return (lam 1: the final score), by position
    bucket and over all tokens, from the completions alone: each of a prefix's K completion scores is a draw of the
    return from that prefix, so ``1 - E[Var(G | prefix)] / Var(G)`` is estimated with the within-prefix variance
    (unbiased, over K) and the variance of all draws at the same positions. Needs K >= 2."""
    import torch

    width = max(len(v) for v in values)
    within, total = [], []
    for t in range(width):
        rows = [v[t] for v in values if len(v) > t]
        if len(rows) < 2:
            continue
        draws = torch.stack(rows)  # [answers, K]
        within.append(float(draws.var(1).mean()))
        total.append(float(draws.flatten().var()))
    out = {}
    for lo, hi, name in ((0, len(within), "all"), (0, 8, "0-7"), (8, 16, "8-15"), (16, 32, "16-31"),
                         (32, len(within), "32+")):
        w, v = sum(within[lo:hi]), sum(total[lo:hi])
        out[name] = 1.0 - w / v if v > 0 else float("nan")
    return out


def critic_batch(data, idx, pad: int, mean, std):
    """(ids, attention mask, mask, target) of the answers ``idx`` of ``data`` = (prompts, answers, scores), right-padded
    with ``pad``: the mask marks the states before each response token, the target is the answer's score standardised
    by ``mean`` and ``std``, at every position."""
    import torch

    prompts, answers, scores = data
    seqs = [prompts[i] + answers[i] for i in idx]
    width = max(map(len, seqs))
    ids = torch.full((len(idx), width), pad)
    attn, mask = torch.zeros(len(idx), width, dtype=torch.long), torch.zeros(len(idx), width)
    for j, (i, seq) in enumerate(zip(idx, seqs)):
        ids[j, : len(seq)], attn[j, : len(seq)] = torch.tensor(seq), 1
        mask[j, len(prompts[i]) - 1 : len(seq) - 1] = 1  # the states before each response token
    target = ((scores[list(idx)] - mean) / std)[:, None].expand(-1, width)
    return ids, attn, mask, target


def critic_values(critic, ids, attn):
    """The critic's value at every position: its score head on its backbone's last hidden states."""
    backbone = getattr(critic, critic.base_model_prefix)
    return critic.score(backbone(input_ids=ids, attention_mask=attn).last_hidden_state)[..., 0]


def train_critics(policy_dir, reward_model_dir, policy, tokenizer, reward_model, *, reward_tokenizer, questions, test,
                  max_new_tokens, eos_ids, epochs, learning_rate, seed):
    """Held-out explained variance (against the final score, lam 1) of critics trained by regression on the final
    scores of answers the policy gives to ``questions``, tested on answers to ``test``: one initialised from the
    reward model (InstructGPT's choice), one from the policy's weights with a new score head, each fully trained;
    both read a value at every response position as PPO's value head does. Returns {name: [EV before training
    (calibrated: ``calibrated_ev``), then after each epoch]}."""
    import random

    import torch
    from transformers import AutoModelForSequenceClassification

    from common.generation import sample_responses
    from common.prompts import format_example, tokenize_prompt
    from common.reward import score_texts

    pad = tokenizer.pad_token_id
    rng = random.Random(seed)

    def sample(qs):
        prompts = [tokenize_prompt(tokenizer, q) for q in qs]
        answers = []
        for s in range(0, len(qs), 64):  # as PPO: a sampled maximum length per generation batch
            length = rng.randint(max_new_tokens // 2, max_new_tokens)
            answers += sample_responses(policy, prompts[s : s + 64], length, 1.0, eos_ids, pad_id=pad)
        texts = [format_example(q, tokenizer.decode(a, skip_special_tokens=True)) for q, a in zip(qs, answers)]
        return prompts, answers, score_texts(reward_model, reward_tokenizer, texts, 64)

    train, held_out = sample(questions), sample(test)
    mean, std = train[2].mean(), train[2].std()

    def batch(data, idx):
        return critic_batch(data, idx, pad, mean, std)

    def predictions(critic, data):
        """The critic's values and their targets at every response position of ``data``'s answers."""
        got, tgt = [], []
        with torch.no_grad():
            for s in range(0, len(data[1]), 32):
                ids, attn, mask, target = batch(data, range(s, min(s + 32, len(data[1]))))
                got.append(critic_values(critic, ids, attn)[mask > 0])
                tgt.append(target[mask > 0])
        return torch.cat(got), torch.cat(tgt)

    def held_out_ev(critic, scale=1.0, shift=0.0):
        v, t = predictions(critic, held_out)
        return 1.0 - float((t - (scale * v + shift)).var() / t.var())

    def calibrated_ev(critic):
        """Before training: the untrained critic's values mapped to the targets' scale by the least-squares line
        fitted on the training answers (a reward model scores on its own scale; what it knows is the ranking)."""
        v, t = predictions(critic, train)
        scale = float(((v - v.mean()) * (t - t.mean())).mean() / v.var(unbiased=False).clamp_min(1e-12))
        return held_out_ev(critic, scale, float(t.mean() - scale * v.mean()))

    out = {}
    for name, path in (("critic from the reward model", reward_model_dir), ("critic from the policy", policy_dir)):
        torch.manual_seed(seed)
        critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        critic.config.pad_token_id = pad
        optimizer = torch.optim.AdamW(critic.parameters(), lr=learning_rate, weight_decay=0.0)
        critic.eval()
        order, curve = list(range(len(questions))), [calibrated_ev(critic)]
        for _ in range(epochs):
            rng.shuffle(order)
            critic.train()
            for s in range(0, len(order), 16):
                ids, attn, mask, target = batch(train, order[s : s + 16])
                loss = (((critic_values(critic, ids, attn) - target) ** 2) * mask).sum() / mask.sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            critic.eval()
            curve.append(held_out_ev(critic))
        out[name] = curve
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the policy (a model folder, e.g. the pipeline's sft_merged)")
    p.add_argument("--reward_model", required=True, help="the reward model folder")
    p.add_argument("--dataset_name", default=ROOT)
    p.add_argument("--subset", default="data/rl")
    p.add_argument("--prompts", type=int, default=48,
                   help="answers whose prefixes are completed (the last prompts); 0: only the learned critics")
    p.add_argument("--continuations", type=int, default=16, help="completions per prefix (K)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda of the returns")
    p.add_argument("--critics", type=int, default=0, help="train critics on this many answers (0: none)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--critic_learning_rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from common.data import load_and_validate
    from common.generation import eos_token_ids
    from common.modeling import load_tokenizer

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model, False, "left")
    policy = AutoModelForCausalLM.from_pretrained(args.model).eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model).eval()
    reward_tokenizer = load_tokenizer(args.reward_model, False, "right")
    eos_ids = eos_token_ids(tokenizer, policy)
    questions = load_and_validate(args.dataset_name, args.subset, "train", ["question"]).dataset["question"]
    if not args.prompts and not args.critics:
        p.error("--prompts 0 needs --critics N")
    if args.prompts + args.critics + 128 * bool(args.critics) > len(questions):
        p.error(f"--prompts + --critics (+ 128 held out) exceed the {len(questions)} questions of {args.subset}")
    if args.prompts:  # 0: the learned critics only
        answers, values, scores = monte_carlo_values(policy, tokenizer, reward_model, reward_tokenizer,
                                                     questions[-args.prompts :], max_new_tokens=args.max_new_tokens,
                                                     k=args.continuations, eos_ids=eos_ids)
        ended = sum(bool(a) and a[-1] in eos_ids for a in answers)
        print(f"{len(answers)} answers ({ended} ended with EOS), {sum(map(len, answers))} response tokens, "
              f"K = {args.continuations} completions per prefix; score mean {scores.mean():.3f}, "
              f"std {scores.std():.3f}\n")
        half = [v[:, : max(1, v.shape[1] // 2)] for v in values]
        rows = [(f"GAE returns, lam {args.lam}, K = {args.continuations}", ceilings(values, scores, args.lam)),
                (f"GAE returns, lam {args.lam}, K = {half[0].shape[1]}", ceilings(half, scores, args.lam)),
                ("Monte Carlo return (lam 1), noise-free", monte_carlo_ceiling(values))]
        keys = list(rows[0][1])
        print("| perfect critic: explained variance against | " +
              " | ".join(k if k == "all" else f"positions {k}" for k in keys) + " |")
        print("| --- " * (len(keys) + 1) + "|")
        for name, row in rows:
            print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    if args.critics:
        first = len(questions) - args.prompts - args.critics - 128
        curves = train_critics(args.model, args.reward_model, policy, tokenizer, reward_model,
                               reward_tokenizer=reward_tokenizer,
                               questions=questions[first : first + args.critics],
                               test=questions[first + args.critics : len(questions) - args.prompts],
                               max_new_tokens=args.max_new_tokens, eos_ids=eos_ids, epochs=args.epochs,
                               learning_rate=args.critic_learning_rate, seed=args.seed)
        print(f"\n| learned critic ({args.critics} answers, held-out 128), EV against the final score | "
              "untrained, calibrated | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |")
        print("| --- " * (args.epochs + 2) + "|")
        for name, curve in curves.items():
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in curve) + " |")


if __name__ == "__main__":
    main()
