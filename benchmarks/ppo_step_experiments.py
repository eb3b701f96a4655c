"""Candidate speed-ups of our PPO step that compute the same thing, measured on the setup of benchmarks/ppo_vs_trl.py.

    python benchmarks/ppo_step_experiments.py --model DIR/tiny --reward_model DIR/rm --rounds 3
    python benchmarks/ppo_step_experiments.py --model DIR/tiny --reward_model DIR/rm --flops   # exact FLOP counts
    # DIR/tiny, DIR/rm: from benchmarks/trl_ppo_baseline.py build_models (EOS suppressed in DIR/tiny)

An experiment, not project code: each variant is a temporary patch (a context manager) around the real
`common.ppo.PPOTrainer` built by `training_rl.build_trainer`. After one warm-up step, one step's rollout batch and
`update` arguments are captured; then, in rounds (variants interleaved, so load from other jobs falls on all alike),
each variant replays
- `update` from the same weights and optimizer state (restored from a deep copy before every replay),
- `generate` on the same prompts from the same torch RNG state and length sampler state,
- `reference_and_values` on the same batch,
timed in wall seconds and in process CPU seconds (all threads: less disturbed by other jobs than wall time,
but not comparable across thread counts), and is compared with the baseline: max |difference| of the final trainable weights, the update's statistics, the
sampled tokens and the rollout log-probs/values. "bitwise" means all differences are exactly 0.

Variants:
- `lora_rank_scale`: peft's LoRA Linear computes `lora_B(lora_A(dropout(x))) * scaling` on the [tokens, out] output;
  this multiplies the [tokens, r] intermediate instead: `lora_B(lora_A(x) * scaling)`, and calls no dropout module
  when its p is 0 (training_rl sets every dropout's p to 0). With scaling a power of two (alpha 32 / r 16 = 2) both
  forms round identically, forward and backward; otherwise they differ by float rounding.
- `trim_padding`: in the update, each minibatch's columns that are padding in all of its rows (left padding up to the
  batch's longest prompt) are cut before the forward; real tokens keep their positions (position ids come from the
  attention mask), the response stays at the end.
- `last_layer`: the policy/value forward (update, old log-probs/values, reference) runs the last decoder layer's
  queries, o_proj, MLP and final norm only at the positions whose hidden state is read (see
  `last_layer_response_only`); keys and values still cover every position.
- `threads1`: `torch.set_num_threads(1)` (default here: 2 = the cores).
- combinations joined with `+`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benchmarks

import torch


@contextlib.contextmanager
def lora_rank_scale():
    from peft.tuners.lora import layer as lora_layer

    original = lora_layer.Linear.forward

    def forward(self, x, *args, **kwargs):
        active = self.active_adapters
        if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1
                or active[0] not in self.lora_A or active[0] in self.lora_variant):
            return original(self, x, *args, **kwargs)
        name = active[0]
        self._check_forward_args(x)
        result = self.base_layer(x)
        dropout = self.lora_dropout[name]
        if not (isinstance(dropout, torch.nn.Identity) or (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0)):
            x = dropout(x)
        x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
        return (result + self.lora_B[name](self.lora_A[name](x) * self.scaling[name])).to(result.dtype)

    lora_layer.Linear.forward = forward
    try:
        yield
    finally:
        lora_layer.Linear.forward = original


@contextlib.contextmanager
def trim_padding():
    from common import ppo

    original = ppo.PPOTrainer.forward

    def forward(self, model, b, rows=slice(None)):
        if not torch.is_tensor(rows):  # the rollout forwards (whole batch): unchanged
            return original(self, model, b, rows)
        attn = b["attention_mask"][rows]
        c0 = int((attn.sum(0) > 0).nonzero()[0])  # first column holding a real token in some row
        if c0 == 0:
            return original(self, model, b, rows)
        logits, values = model(b["input_ids"][rows][:, c0:], attn[:, c0:], b["position_ids"][rows][:, c0:], b["P"] - c0,
                               self.hp.temperature)
        return logits, values, ppo.logprobs_from_logits(logits, b["responses"][rows])

    ppo.PPOTrainer.forward = forward
    try:
        yield
    finally:
        ppo.PPOTrainer.forward = original


@contextlib.contextmanager
def last_layer_response_only():
    """`PolicyWithValueHead.forward` with the last decoder layer run for its queries only at the positions whose
    hidden state is read (P-1 .. second-to-last): keys and values still cover every position, but the queries,
    attention output, o_proj, residual, MLP and final norm of the prompt positions (unused: no layer follows) are
    skipped. Llama-style decoders only (this experiment)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import rotate_half

    from common import ppo

    original = ppo.PolicyWithValueHead.forward

    def forward(self, input_ids, attention_mask, position_ids, response_start, temperature=1.0):
        lm = self.lm()
        dec = lm.get_decoder()
        h = dec.embed_tokens(input_ids)
        mask = create_causal_mask(config=dec.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        cos, sin = dec.rotary_emb(h, position_ids=position_ids)
        for layer in dec.layers[:-1]:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids)
        last, T = dec.layers[-1], h.shape[1]
        attn, s = last.self_attn, slice(response_start - 1, T - 1)
        x = last.input_layernorm(h)
        B, Q = x.shape[0], T - response_start
        q = attn.q_proj(x[:, s]).view(B, Q, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        cq, sq = cos[:, s].unsqueeze(1), sin[:, s].unsqueeze(1)
        q = (q * cq) + (rotate_half(q) * sq)  # apply_rotary_pos_emb's formula, on the kept queries
        k = (k * cos.unsqueeze(1)) + (rotate_half(k) * sin.unsqueeze(1))
        if mask is None:  # no padding: the causal mask of the kept query rows
            qmask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[s][None, None].expand(B, 1, Q, T)
        else:
            qmask = mask[:, :, s, :]
        out, _ = sdpa_attention_forward(attn, q, k, v, qmask, dropout=0.0, scaling=attn.scaling, is_causal=False)
        h = h[:, s] + attn.o_proj(out.reshape(B, Q, -1).contiguous())
        h = h + last.mlp(last.post_attention_layernorm(h))
        h = dec.norm(h)
        logits = lm.get_output_embeddings()(h).float() / temperature
        return logits, self.value_head(h.float()).squeeze(-1)

    ppo.PolicyWithValueHead.forward = forward
    try:
        yield
    finally:
        ppo.PolicyWithValueHead.forward = original


@contextlib.contextmanager
def threads1():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


VARIANTS = {"lora_rank_scale": lora_rank_scale, "trim_padding": trim_padding, "threads1": threads1,
            "last_layer": last_layer_response_only}


@contextlib.contextmanager
def variant(name: str):
    with contextlib.ExitStack() as stack:
        for part in ([] if name == "baseline" else name.split("+")):
            stack.enter_context(VARIANTS[part]())
        yield


def capture(trainer) -> dict:
    """One real step, keeping its prompts and the arguments of its `update` call."""
    got = {}
    gen, upd = trainer.generate, trainer.update

    def generate(batch):
        got["batch"] = batch
        return gen(batch)

    def update(*args):
        got["update"], got["step_count"] = args, trainer.step_count  # the update's shuffle is seeded by step_count
        return upd(*args)

    trainer.generate, trainer.update = generate, update
    trainer.step()
    del trainer.generate, trainer.update
    return got


def maxdiff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max((maxdiff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict):
        return max((maxdiff(a[k], b[k]) for k in a), default=0.0)
    if torch.is_tensor(a):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    return abs(float(a) - float(b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--reward_model", required=True)
    p.add_argument("--out_dir", default="/tmp/ppo_step_experiments")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--flops", action="store_true",
                   help="instead of timing: count each variant's matmul/attention FLOPs (torch.utils.flop_counter), no noise")
    p.add_argument("--variants", default="baseline,lora_rank_scale,last_layer,lora_rank_scale+last_layer,threads1,trim_padding")
    a = p.parse_args(argv)

    from profile_ppo_step import build

    trainer = build(a.model, a.reward_model, a.out_dir)
    trainer.step()  # warm-up
    got = capture(trainer)
    b, upd_args = got["update"][0], got["update"][1:]
    batch = got["batch"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = [q for q in model.parameters() if q.requires_grad]
    snapshot = trainer._snapshot()
    step_count, length_state = got["step_count"], trainer.length_rng.getstate()
    names = a.variants.split(",")
    if a.flops:
        from torch.utils.flop_counter import FlopCounterMode

        base = None
        print(f"{'variant':34}{'update GFLOP':>14}{'ref+values GFLOP':>18}")
        for name in names:
            counts = []
            with variant(name):
                trainer._restore(copy.deepcopy(snapshot))
                trainer.step_count = step_count
                for call in (lambda: trainer.update(b, *upd_args), lambda: trainer.reference_and_values(b)):
                    with FlopCounterMode(display=False) as fc:
                        call()
                    counts.append(fc.get_total_flops() / 1e9)
            trainer._restore(copy.deepcopy(snapshot))
            base = base or counts
            print(f"{name:34}{counts[0]:14.2f}{counts[1]:18.2f}   ({1 - counts[0] / base[0]:.1%}, {1 - counts[1] / base[1]:.1%} fewer)")
        return
    times = {n: {"update": [], "generate": [], "reference_and_values": []} for n in names}
    cpu = {n: {"update": [], "generate": [], "reference_and_values": []} for n in names}  # process CPU seconds
    outputs = {}
    print(f"loadavg {list(os.getloadavg())}, torch threads {torch.get_num_threads()}", flush=True)
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            with variant(name):
                trainer._restore(copy.deepcopy(snapshot))
                trainer.step_count = step_count
                t, c = time.perf_counter(), time.process_time()
                stats = trainer.update(b, *upd_args)
                times[name]["update"].append(time.perf_counter() - t)
                cpu[name]["update"].append(time.process_time() - c)
                weights = [q.detach().clone() for q in trainable]
                trainer._restore(copy.deepcopy(snapshot))

                torch.manual_seed(1234)
                random.seed(1234)
                trainer.length_rng.setstate(length_state)
                t, c = time.perf_counter(), time.process_time()
                responses = trainer.generate(batch)
                times[name]["generate"].append(time.perf_counter() - t)
                cpu[name]["generate"].append(time.process_time() - c)

                t, c = time.perf_counter(), time.process_time()
                rollout = trainer.reference_and_values(b)
                times[name]["reference_and_values"].append(time.perf_counter() - t)
                cpu[name]["reference_and_values"].append(time.process_time() - c)
            if r == 0:
                outputs[name] = {"weights": weights, "stats": stats, "responses": responses, "rollout": rollout}
            print(f"round {r + 1} {name:34} update {times[name]['update'][-1]:.3f} s  generate "
                  f"{times[name]['generate'][-1]:.3f} s  ref+values {times[name]['reference_and_values'][-1]:.3f} s",
                  flush=True)
    print(f"loadavg {list(os.getloadavg())}")
    base = outputs["baseline"]
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    med_cpu = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in cpu.items()}
    print(f"\n{'variant':34}{'update s':>10}{'gain':>8}{'generate s':>12}{'gain':>8}{'ref+val s':>11}{'gain':>8}"
          f"   max|diff| weights / stats / tokens / rollout")
    for n in names:
        o = outputs[n]
        diffs = [maxdiff(o["weights"], base["weights"]), maxdiff(o["stats"], base["stats"]),
                 float(o["responses"] != base["responses"]), maxdiff(o["rollout"], base["rollout"])]
        cells = "".join(f"{med[n][k]:{w}.3f}{1 - med[n][k] / med['baseline'][k]:8.1%}"
                        for k, w in (("update", 10), ("generate", 12), ("reference_and_values", 11)))
        print(f"{n:34}{cells}   " + " / ".join(f"{d:.1e}" for d in diffs) + ("  bitwise" if not any(diffs) else ""))
        print(f"{'  CPU s (all threads)':34}" + "".join(f"{med_cpu[n][k]:{w}.3f}{1 - med_cpu[n][k] / med_cpu['baseline'][k]:8.1%}"
              for k, w in (("update", 10), ("generate", 12), ("reference_and_values", 11))))
        if diffs[1]:
            print(" " * 36 + "stats: " + ", ".join(f"{k} {o['stats'][k]:.6g} vs {base['stats'][k]:.6g}"
                                                 for k in base["stats"] if o["stats"][k] != base["stats"][k]))


if __name__ == "__main__":
    main()
