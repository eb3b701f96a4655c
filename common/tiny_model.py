"""Build a tiny random Llama and a byte-level BPE tokenizer trained on the sample data, offline; or the pretrained one.

    python -m common.tiny_model --output_dir models/tiny              # random weights (tests that need shapes)
    python -m common.tiny_model --pretrained --output_dir models/base # the committed pretrained base (a copy)
    python -m common.tiny_model --pretrain --output_dir models/base   # build that base again from scratch

Tests, the demo pipeline and the benchmarks use it instead of a Hub model: nothing is downloaded, and the same
arguments always give byte-identical files. The tokenizer follows Llama's conventions (``<s>`` prepended,
``</s>`` as EOS, no pad token), so the pad-token handling of the real loading code is exercised.

The pretrained base (``assets/tiny-pretrained/``, README.md there) is the same 3.95M-parameter Llama (hidden 256,
4 layers, vocab 2048, 15.8 MB of float32 safetensors) trained from scratch on ``data/pretrain/train.jsonl``
by ``pretrain``: every document tokenized exactly as SFT tokenizes an example, packed whole (never cut between
question and answer) into 512-token blocks, 4 blocks a step, 2 epochs (1723 steps), AdamW 2e-3 with cosine decay,
fixed seeds and data order, float32 on CPU. It is evaluated on the ``evaluation`` split's questions and preferred
answers, which the corpus does not contain; its run time, held-out loss and sample answers are in
``assets/tiny-pretrained/README.md``. ``--pretrained`` copies the committed
files, or runs ``pretrain`` when they are missing; ``--samples N`` then prints gold scores of N answers
(``sample_report``, common/gold_report.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import common.quiet  # noqa: F401  (first: silences known library messages)

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def _texts(data_dir: str):
    """Every question and answer of the sample data, in a fixed order."""
    files = sorted(glob.glob(os.path.join(data_dir, "**", "*.jsonl"), recursive=True))
    if not files:
        raise SystemExit(f"error: no .jsonl files under {data_dir} to train the tokenizer on")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key in ("question", "response_j", "response_k"):
                    if isinstance(row.get(key), str):
                        yield row[key]


def build_tokenizer(data_dir: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(data_dir), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    )


def build_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 8 / 3 / 16 + 1) * 16,  # Llama's 8/3 ratio, rounded up to 16
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = None
    return model


# ------------------------------------------------------------------------------------------ pretraining

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "data")
PRETRAINED_DIR = os.path.join(REPO, "assets", "tiny-pretrained")
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ANSWER_SEP = "\n\nAnswer: "


def pretrain_documents(data_dir: str) -> list[tuple[str, str]]:
    """(question, answer) of every document of ``data/pretrain/train.jsonl``, in file order."""
    path = os.path.join(data_dir, "pretrain", "train.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no pretraining corpus at {path}; write it with `python data/generate.py`")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            text = json.loads(line)["text"]
            if not text.startswith("Question: ") or ANSWER_SEP not in text:
                raise SystemExit(f"error: {path} line {n}: not 'Question: ...\\n\\nAnswer: ...'")
            question, answer = text[len("Question: "):].split(ANSWER_SEP, 1)
            docs.append((question, answer))
    return docs


def heldout_examples(data_dir: str) -> list[tuple[str, str]]:
    """(question, preferred answer) of the ``evaluation`` split: text the pretraining corpus does not contain."""
    with open(os.path.join(data_dir, "evaluation", "train.jsonl"), encoding="utf-8") as f:
        return [(row["question"], row["response_j"]) for row in map(json.loads, f)]


def encode(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """Tokens of one document exactly as SFT tokenizes an example (common/prompts.py): the PPO prompt's ids
    (``<s>Question: ...\n\nAnswer: ``), then the answer's, then ``</s>``."""
    from common.prompts import tokenize_example

    return tokenize_example(tokenizer, question, answer)


def pack(docs: list[list[int]], block_size: int, window: int = 16) -> list[list[int]]:
    """Document-aligned packing: documents go whole into blocks of at most ``block_size`` tokens, in the given
    order except that a block is topped up with the first of the next ``window`` documents that still fit (a
    document longer than a block is cut). No answer is ever separated from its question, which a small model needs
    to learn to answer *this* question; on the corpus the look-ahead fills 512-token blocks to 86% (79% without)."""
    pending = [ids[:block_size] for ids in docs]
    blocks, head = [], 0
    taken = [False] * len(pending)
    while head < len(pending):
        cur, i, looked = [], head, 0
        while i < len(pending) and looked < window:
            if not taken[i]:
                looked += 1
                if len(cur) + len(pending[i]) <= block_size:
                    cur += pending[i]
                    taken[i] = True
            i += 1
        blocks.append(cur)
        while head < len(pending) and taken[head]:
            head += 1
    return blocks


def _batch(blocks: list[list[int]], pad_id: int):
    """Right-padded input ids and labels (-100 on padding); causal attention never looks at the padding."""
    width = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), width), -100, dtype=torch.long)
    for i, b in enumerate(blocks):
        ids[i, : len(b)] = torch.tensor(b)
        labels[i, : len(b)] = torch.tensor(b)
    return ids, labels


@torch.no_grad()
def heldout_loss(model, tokenizer, examples: list[tuple[str, str]], batch_size: int = 16) -> tuple[float, float]:
    """Mean per-token loss (nats) of ``examples`` one per row: over every token after ``<s>`` (the question, the
    answer and ``</s>``), and over the answer and ``</s>`` only."""
    model.eval()
    total = [0.0, 0.0]
    count = [0, 0]
    for start in range(0, len(examples), batch_size):
        enc = [encode(tokenizer, q, a) for q, a in examples[start:start + batch_size]]
        ids, labels = _batch([e["input_ids"] for e in enc], tokenizer.eos_token_id)
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        valid = target != -100
        answer = torch.zeros_like(valid)
        for i, e in enumerate(enc):
            answer[i, : len(e["completion_mask"]) - 1] = torch.tensor(e["completion_mask"][1:], dtype=torch.bool)
        for k, mask in enumerate((valid, answer & valid)):
            total[k] += nll[mask].sum().item()
            count[k] += int(mask.sum())
    return total[0] / count[0], total[1] / count[1]


def pretrain(output_dir: str, data_dir: str = DATA_DIR, vocab_size: int = 2048, hidden_size: int = 256,
             num_layers: int = 4, *, num_heads: int = 4, seed: int = 0, epochs: float = 2.0, block_size: int = 512,
             batch_size: int = 4, learning_rate: float = 2e-3, warmup_steps: int = 30, min_lr_ratio: float = 0.1,
             weight_decay: float = 0.01, max_steps: int = 0, eval_every: int = 200, log_every: int = 25,
             heldout_n: int = 0) -> dict:
    """Train the tiny Llama on ``data/pretrain/train.jsonl`` from scratch, deterministically, and save it.

    Tokenizer as ``build_tokenizer``; model as ``build_model`` (seeded); every document tokenized as SFT does
    (``encode``), packed whole into ``block_size`` blocks (``pack``) in an order shuffled by ``random.Random(seed +
    epoch)``, ``batch_size`` blocks a step; AdamW (betas 0.9/0.95), linear warm-up then cosine decay to
    ``min_lr_ratio``, gradient norm clipped at 1; float32 on CPU. ``epochs`` may be fractional; ``max_steps`` > 0
    stops earlier (the schedule still spans the epochs); ``heldout_n`` > 0 evaluates only that many held-out
    examples (a quick check). Prints the held-out loss (``heldout_loss`` on the
    ``evaluation`` split) and the wall time, and writes them to ``pretrain_stats.json`` next to the weights.
    """
    import time

    start = time.time()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(data_dir, vocab_size)
    model = build_model(tokenizer, hidden_size, num_layers, num_heads, seed)
    n_params = sum(p.numel() for p in model.parameters())
    docs = [encode(tokenizer, q, a)["input_ids"] for q, a in pretrain_documents(data_dir)]
    heldout = heldout_examples(data_dir)
    heldout = heldout[:heldout_n] if heldout_n > 0 else heldout
    n_tokens = sum(map(len, docs))

    blocks = _schedule(docs, seed, epochs, block_size)
    total_steps = len(blocks) // batch_size
    steps = min(total_steps, max_steps) if max_steps > 0 else total_steps
    print(f"pretraining: {n_params / 1e6:.2f}M parameters, {len(docs)} documents, {n_tokens / 1e6:.2f}M tokens an "
          f"epoch, {len(blocks)} blocks of <= {block_size} tokens, {steps} steps of {batch_size} blocks", flush=True)

    optimizer = _optimizer(model, learning_rate, weight_decay)
    lr_at = _lr_schedule(learning_rate, warmup_steps, min_lr_ratio, total_steps)
    history = []
    running, seen = 0.0, 0
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = _batch(blocks[step * batch_size:(step + 1) * batch_size], tokenizer.eos_token_id)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        seen += 1
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {running / seen:.4f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
            running, seen = 0.0, 0
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            loss_all, loss_answer = heldout_loss(model, tokenizer, heldout[:100])
            history.append({"step": step + 1, "heldout_loss_100": round(loss_all, 4),
                            "heldout_answer_loss_100": round(loss_answer, 4), "seconds": round(time.time() - start)})
            print(f"step {step + 1}: held-out loss (first 100 evaluation examples) {loss_all:.4f}, "
                  f"answer only {loss_answer:.4f}", flush=True)

    train_seconds = time.time() - start
    loss_all, loss_answer = heldout_loss(model, tokenizer, heldout)
    stats = {
        "parameters": n_params, "vocab_size": len(tokenizer), "hidden_size": hidden_size, "num_layers": num_layers,
        "num_heads": num_heads, "seed": seed, "epochs": epochs, "block_size": block_size, "batch_size": batch_size,
        "learning_rate": learning_rate, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
        "weight_decay": weight_decay, "steps": steps, "tokens_per_epoch": n_tokens,
        "heldout_loss": round(loss_all, 4), "heldout_answer_loss": round(loss_answer, 4),
        "heldout_examples": len(heldout), "train_seconds": round(train_seconds), "history": history,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    _save(output_dir, model, tokenizer, stats)
    print(f"held-out loss {loss_all:.4f} (answer only {loss_answer:.4f}) on {len(heldout)} evaluation examples; "
          f"{steps} steps in {train_seconds:.0f}s wall -> {output_dir}", flush=True)
    return stats


def _schedule(docs: list[list[int]], seed: int, epochs: float, block_size: int) -> list[list[int]]:
    """The whole schedule's blocks, epoch by epoch, each epoch's documents in the order ``random.Random(seed +
    epoch)`` shuffles them to (a fractional last epoch takes the first part of its order)."""
    import math
    import random

    blocks = []
    for epoch in range(math.ceil(epochs)):
        order = list(range(len(docs)))
        random.Random(seed + epoch).shuffle(order)
        epoch_blocks = pack([docs[i] for i in order], block_size)
        blocks += epoch_blocks[: round(len(epoch_blocks) * min(1.0, epochs - epoch))]
    return blocks


def _optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95), weight decay on the matrices only."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, betas=(0.9, 0.95))


def _lr_schedule(learning_rate: float, warmup_steps: int, min_lr_ratio: float, total_steps: int):
    """The learning rate at each step: linear warm-up, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    import math

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return learning_rate * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def _save(output_dir: str, model, tokenizer, stats: dict) -> None:
    """The weights, the tokenizer and ``pretrain_stats.json`` in ``output_dir``."""
    model.eval()
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "pretrain_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)


def install_pretrained(output_dir: str, data_dir: str = DATA_DIR, source: str = PRETRAINED_DIR) -> str:
    """Put the pretrained tiny base in ``output_dir``: a copy of the committed files in ``source``
    (assets/tiny-pretrained/), or, where they are missing, the same model built by ``pretrain`` (minutes)."""
    import shutil

    os.makedirs(output_dir, exist_ok=True)
    if all(os.path.isfile(os.path.join(source, f)) for f in WEIGHT_FILES):
        for f in WEIGHT_FILES:
            shutil.copyfile(os.path.join(source, f), os.path.join(output_dir, f))
        print(f"pretrained tiny Llama: copied {source} -> {output_dir}")
    else:
        print(f"no committed weights in {source}: pretraining them (this takes minutes)")
        pretrain(output_dir, data_dir)
    return output_dir


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="models/tiny")
    parser.add_argument("--data_dir", default=DATA_DIR)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pretrain", action="store_true", help="Pretrain the tiny base on data/pretrain (minutes).")
    mode.add_argument("--pretrained", action="store_true",
                      help="Copy the committed pretrained base (assets/tiny-pretrained/), or pretrain it if missing.")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    pre = parser.add_argument_group("pretraining (--pretrain)")
    pre.add_argument("--epochs", type=float, default=2.0)
    pre.add_argument("--block_size", type=int, default=512)
    pre.add_argument("--batch_size", type=int, default=4)
    pre.add_argument("--learning_rate", type=float, default=2e-3)
    pre.add_argument("--warmup_steps", type=int, default=30)
    pre.add_argument("--max_steps", type=int, default=0, help="Stop after this many steps (0: the whole schedule).")
    pre.add_argument("--eval_every", type=int, default=200)
    parser.add_argument("--samples", type=int, default=0,
                        help="After --pretrain/--pretrained: answer this many evaluation questions "
                             "and report gold scores.")
    parser.add_argument("--show", type=int, default=3, help="With --samples: print this many answers of each kind.")
    args = parser.parse_args(argv)

    if args.pretrain:
        pretrain(args.output_dir, args.data_dir, args.vocab_size, args.hidden_size, args.num_layers,
                 num_heads=args.num_heads, seed=args.seed, epochs=args.epochs, block_size=args.block_size,
                 batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                 max_steps=args.max_steps, eval_every=args.eval_every)
    elif args.pretrained:
        install_pretrained(args.output_dir, args.data_dir)
    else:
        tokenizer = build_tokenizer(args.data_dir, args.vocab_size)
        model = build_model(tokenizer, args.hidden_size, args.num_layers, args.num_heads, args.seed)
        os.makedirs(args.output_dir, exist_ok=True)
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        n = sum(p.numel() for p in model.parameters())
        print(f"tiny Llama: {n / 1e6:.2f}M parameters, vocab {len(tokenizer)} -> {args.output_dir}")
    if args.samples and (args.pretrain or args.pretrained):
        from common.gold_report import sample_report  # evaluation code: the model builder knows no judge

        sample_report(args.output_dir, args.data_dir, n=args.samples, show=args.show)
    return args.output_dir


if __name__ == "__main__":
    main()
