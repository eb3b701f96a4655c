"""One `PPOTrainer.update` on a fixed batch of responses of unequal lengths, with plain SGD at lr 1 (the weight change
is minus the gradient), for tests/test_ppo_core.py.

    python tests/ppo_update_worker.py --mini 4 --accum 1 --out one.pt                         # one process, 4 rows
    python -m torch.distributed.run --nproc_per_node 2 tests/ppo_update_worker.py --mini 1 --accum 2 --out two.pt
    python tests/ppo_update_worker.py --mini 4 --accum 1 --algorithm grpo --loss_type grpo --out one.pt  # GRPO's loss

With N processes, process r takes rows [r * 4 / N, (r + 1) * 4 / N) of the same four. Process 0 writes the weights
after the update.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROMPTS = [[1, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15], [1, 16]]
RESPONSES = [[20, 21, 22, 23, 24, 25, 2], [30, 2], [31, 32, 33, 34], [40, 41, 42, 43, 44, 45, 46, 47, 48, 2]]


def tiny_policy():
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.ppo import PolicyWithValueHead

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    model = PolicyWithValueHead(LlamaForCausalLM(config))
    torch.nn.init.normal_(model.value_head.weight, std=0.5)  # non-zero, so the value loss has a gradient to check
    return model


def run_update(mini: int, accum: int, cliprange_value: float | None = 0.2, algorithm: str = "ppo",
               loss_type: str | None = None) -> dict[str, torch.Tensor]:
    """PPO: per-token advantages and returns; RLOO and GRPO (``algorithm``): one advantage per response, groups of
    2, the reference log-probs away from the old ones (GRPO's KL term is non-zero), ``loss_type`` as the flag."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from common.ppo import PPOConfig, PPOTrainer

    accelerator = Accelerator(cpu=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    per = len(PROMPTS) // world
    rows = slice(rank * per, (rank + 1) * per)
    model = tiny_policy()
    critic_free = algorithm != "ppo"
    config = PPOConfig(batch_size=per, mini_batch_size=mini, gradient_accumulation_steps=accum, ppo_epochs=1,
                       learning_rate=1.0, max_grad_norm=None, cliprange_value=cliprange_value, algorithm=algorithm,
                       num_generations=2 if critic_free else None, loss_type=loss_type, output_max_length=12)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    trainer = PPOTrainer(accelerator, model, tokenizer, reward_model=None, reward_tokenizer=None, prompts=[],
                         config=config, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    b = trainer.collate([{"input_ids": p} for p in PROMPTS], RESPONSES)  # all four, then this process's rows
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(4, b["mask"].shape[1], generator=g) * b["mask"]
    returns = torch.randn(4, b["mask"].shape[1], generator=g) * b["mask"]
    if critic_free:
        advantages, returns = torch.tensor([1.0, -1.0, 0.5, -0.5]), None
    with torch.no_grad():
        old_values, old_logprobs, _ = trainer.forward(model, b, slice(None))
    old_logprobs = old_logprobs - 0.05 * torch.arange(old_logprobs.shape[1])  # ratios away from 1: some clipped
    R = old_logprobs.shape[1]
    mine = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    if critic_free:
        ref_logprobs = old_logprobs + 0.3 * torch.cos(torch.arange(R, dtype=torch.float32))
        stats = trainer.update(mine, old_logprobs[rows], old_values[rows], advantages[rows], None,
                               ref_logprobs=ref_logprobs[rows],
                               kl_coef=0.5)
    else:
        stats = trainer.update(mine, old_logprobs[rows], old_values[rows], advantages[rows, :R], returns[rows, :R])
    assert stats is not None and stats["ppo/updates"] == 1
    weights = {k: v.detach().clone() for k, v in accelerator.unwrap_model(trainer.model).state_dict().items()}
    weights["stats"] = torch.tensor([stats[k] for k in sorted(stats) if k != "ppo/updates"])
    return weights


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mini", type=int, required=True)
    parser.add_argument("--accum", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--algorithm", default="ppo")
    parser.add_argument("--loss_type", default=None)
    args = parser.parse_args()
    result = run_update(args.mini, args.accum, algorithm=args.algorithm, loss_type=args.loss_type)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, args.out)
    if torch.distributed.is_initialized():
        # Leave the process group before exit: a gloo group torn down by the interpreter's shutdown can abort
        # ("terminate called without an active exception"), seen once in CI on the second process.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
