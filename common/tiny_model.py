"""Build a tiny random Llama and a byte-level BPE tokenizer trained on the sample data, offline.

    python -m common.tiny_model --output_dir models/tiny

Tests, the demo pipeline and the benchmarks use it instead of a Hub model: nothing is downloaded, and the same
arguments always give byte-identical files. The tokenizer follows Llama's conventions (``<s>`` prepended,
``</s>`` as EOS, no pad token), so the pad-token handling of the real loading code is exercised.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="models/tiny")
    parser.add_argument("--data_dir",
                        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer(args.data_dir, args.vocab_size)
    model = build_model(tokenizer, args.hidden_size, args.num_layers, args.num_heads, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama: {n / 1e6:.2f}M parameters, vocab {len(tokenizer)} -> {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main()
