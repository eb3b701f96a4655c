"""Every setting of the PPO, RLOO and GRPO algorithm (``PPOConfig``) and its checks, parsed from the command line by
training_rl.py; the trainer (common/ppo.py), its checkpoints (common/ppo_checkpoint.py) and the device plumbing
(common/ppo_distributed.py) read it. Plain data: it imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PPOConfig:
    """Every setting of the PPO algorithm. Defaults are StackLLaMA's (docs/stackllama.md, "training_rl.py")."""

    steps: int = field(
        default=20000, metadata={"help": "Episodes (responses) per process: ceil(steps / batch_size) PPO steps."})
    batch_size: int = field(default=32, metadata={"help": "Responses per PPO step, per process."})
    mini_batch_size: int = field(default=1, metadata={"help": "Responses per forward/backward in the update."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Minibatches per optimizer step."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch."})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "Optimizer learning rate."})
    adafactor: bool = field(default=False, metadata={"help": "Use Adafactor instead of AdamW."})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "transformers scheduler name (over PPO steps)."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    early_stopping: bool = field(
        default=False, metadata={"help": "Stop a step's updates once approx-KL > 1.5 * target_kl."})
    target_kl: float = field(default=0.1, metadata={"help": "Approx-KL threshold for --early_stopping."})
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial KL penalty coefficient."})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "Adapt the KL coefficient towards --target."})
    target: float = field(default=6.0, metadata={"help": "Target KL (nats per response) of the adaptive controller."})
    horizon: int = field(default=10000, metadata={"help": "Horizon (episodes) of the adaptive controller."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float | None = field(
        default=0.2, metadata={"help": "Value clip, in units of the shaped score (None: no value clipping)."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    output_min_length: int = field(default=32, metadata={"help": "Lower bound of the sampled max_new_tokens."})
    output_max_length: int = field(default=128, metadata={"help": "Upper bound of the sampled max_new_tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (top_k=0, top_p=1)."})
    batched_gen: bool = field(
        default=True, metadata={"help": "Generate --generation_batch_size prompts at once (false: one by one)."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Prompts per generate() call (default: --batch_size)."})
    reward_baseline: float = field(default=0.0, metadata={"help": "Subtracted from every score."})
    reward_normalization: str = field(
        default="running", metadata={"help": "Scale of the scores PPO optimises: running (mean 0, std 1 under running "
                                             "statistics of the scores seen so far), stats (the reward model's "
                                             "reward_stats.json) or none (raw).",
                                     "choices": ["none", "stats", "running"]})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip shaped scores to +-this (None: no clip)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response that never ended."})
    reward_batch_size: int = field(default=16, metadata={"help": "Texts per reward-model forward."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, shuffling and initialisation."})
    algorithm: str = field(
        default="ppo", metadata={"help": "ppo (a value head and GAE), rloo (k samples per prompt, leave-one-out "
                                         "baseline, KL in the reward) or grpo (k samples per prompt, group-normalised "
                                         "advantages, KL in the loss); docs/critic_free.md.",
                                 "choices": ["ppo", "rloo", "grpo"]})
    num_generations: int | None = field(
        default=None, metadata={"help": "rloo/grpo: samples per prompt, k (default 4); --batch_size responses are "
                                        "batch_size / k prompts x k samples."})
    scale_rewards: str | None = field(
        default=None, metadata={"help": "grpo: divide the group-centred scores by the group's std (group, the "
                                        "default), the process's batch's (batch), or not at all (none: Dr. GRPO)."})
    loss_type: str | None = field(
        default=None, metadata={"help": "rloo/grpo: how token losses add up: token (each token alike over the "
                                        "optimizer step, as PPO; the default), grpo (mean per answer, then over "
                                        "answers) or dr_grpo (sum over tokens / (answers x --output_max_length))."})

    @property
    def gen_batch_size(self) -> int:
        return (self.generation_batch_size or self.batch_size) if self.batched_gen else 1

    @property
    def group_size(self) -> int:
        """Samples per prompt: 1 for PPO, ``--num_generations`` (default 4) for RLOO and GRPO."""
        return 1 if self.algorithm == "ppo" else (self.num_generations or 4)

    @property
    def prompts_per_step(self) -> int:
        """Prompts per step and process: each is answered ``group_size`` times."""
        return self.batch_size // self.group_size

    def problems(self) -> list[str]:
        """Every argument problem, each naming its flag (training_rl.check_args raises them together)."""
        out = []
        for name in ("steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "target",
                     "horizon", "output_min_length", "output_max_length", "reward_batch_size", "generation_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                out.append(f"--{name} must be > 0, got {value}")
        for name in ("learning_rate", "temperature", "cliprange"):
            if getattr(self, name) <= 0:
                out.append(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.cliprange_value is not None and self.cliprange_value <= 0:
            out.append(f"--cliprange_value must be > 0 (or None: no clipping), got {self.cliprange_value}")
        if self.mini_batch_size > 0 and self.gradient_accumulation_steps > 0 and \
                self.batch_size % (self.mini_batch_size * self.gradient_accumulation_steps):
            out.append(f"--batch_size {self.batch_size} must be divisible by --mini_batch_size {self.mini_batch_size} "
                       f"x --gradient_accumulation_steps {self.gradient_accumulation_steps}")
        if self.algorithm == "ppo":
            for name in ("num_generations", "scale_rewards", "loss_type"):
                if getattr(self, name) is not None:
                    out.append(f"--{name} is a setting of --algorithm rloo or grpo, not of ppo")
        else:
            k = self.group_size
            if k < 2:
                out.append(f"--num_generations must be >= 2 (the baseline comes from the other samples), got {k}")
            elif self.batch_size > 0 and self.batch_size % k:
                out.append(f"--batch_size {self.batch_size} must be divisible by --num_generations {k}")
            if self.scale_rewards is not None and self.algorithm != "grpo":
                out.append("--scale_rewards is a setting of --algorithm grpo")
            if self.scale_rewards not in (None, "group", "batch", "none"):
                out.append(f"--scale_rewards must be group, batch or none, got {self.scale_rewards}")
            if self.loss_type not in (None, "token", "grpo", "dr_grpo"):
                out.append(f"--loss_type must be token, grpo or dr_grpo, got {self.loss_type}")
        if self.output_min_length > self.output_max_length:
            out.append(f"--output_min_length {self.output_min_length} > --output_max_length {self.output_max_length}")
        return out
