"""A PPO run's checkpoints and model files, the half of ``common.ppo.PPOTrainer`` that writes and reads them.

``PPOCheckpoints`` (the trainer's base class) saves and restores everything a run needs to continue exactly, through
accelerate's ``save_state`` with hooks that write the policy as an adapter (or full model) plus its value head, and
the run's own small states as JSON (``STATE_FILE``); ``check_algorithm`` refuses a checkpoint of another algorithm;
``load_policy_weights`` reads the policy files back strictly. What changes with the checkpoint format is here; the
algorithm is in common/ppo.py and common/ppo_math.py.
"""

from __future__ import annotations

import json
import os
import shutil

from common.checkpoints import write_origin
from common.cli import UserError
from common.outputs import check_processes, replace_folder, writing
from common.ppo_config import PPOConfig
from common.ppo_distributed import distributed_type

VALUE_HEAD_FILE = "value_head.safetensors"
STATE_FILE = "run_state.json"  # the run's own states (PPOTrainer._run_state), plain JSON



class PPOCheckpoints:
    """Checkpoints of a ``PPOTrainer`` (common/ppo.py), which derives from this class. Reads the trainer's
    ``accelerator``, ``model`` (the prepared ``PolicyWithValueHead``), ``config``, ``origin`` (the model trained,
    set by training_rl.py) and the run's small states: ``progress``, ``kl_ctl``, ``running``, ``stream``,
    ``length_sampler`` and ``scheduler``."""

    def _run_state(self) -> dict:
        """The run's own small states, by name (each a plain ``state_dict``), saved as JSON in ``STATE_FILE``."""
        parts = {"progress": self.progress, "kl_controller": self.kl_ctl, "running_moments": self.running,
                 "prompt_stream": self.stream, "length_sampler": self.length_sampler, "scheduler": self.scheduler}
        return {name: obj for name, obj in parts.items() if obj is not None}

    def save_checkpoint(self, folder: str, extra_files: dict[str, str] | None = None) -> None:
        """Everything needed to continue exactly: through ``accelerator.save_state`` the policy and value head
        (``_save_weights_hook``), optimizer and per-process RNG states (which accelerate loads with
        ``weights_only=True``); the run's own state (counters, KL controller, running moments, prompt position,
        length sampler, scheduler) as JSON in ``STATE_FILE``; ``trainer_state.json`` last. Written to
        ``folder.tmp``, then swapped in (``replace_folder``)."""
        acc = self.accelerator
        tmp = folder + ".tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        with writing(f"checkpoint {folder}"):
            acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            extra_files = {**(extra_files or {}), STATE_FILE: json.dumps(
                {name: obj.state_dict() for name, obj in self._run_state().items()}, indent=1)}
            for name, text in extra_files.items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            state = {"global_step": self.progress.step, "episodes": self.progress.episodes,
                     "num_processes": acc.num_processes, "kl_coef": self.kl_ctl.value,
                     "algorithm": self.config.algorithm, "group_size": self.config.group_size,
                     "distributed_type": distributed_type(acc)}
            with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
            write_origin(tmp, getattr(self, "origin", None) or {})  # last: the model trained, every file's size
            replace_folder(tmp, folder)
        acc.wait_for_everyone()

    def load_checkpoint(self, folder: str) -> None:
        """Restore everything ``save_checkpoint`` wrote; refuse a checkpoint of another number of processes."""
        acc = self.accelerator
        if not os.path.isfile(os.path.join(folder, "random_states_0.pkl")):
            raise UserError(f"{folder} is not a checkpoint of this version of training_rl.py (no random_states_0.pkl); "
                            "start a new run, or resume with the version that wrote it")
        check_processes(folder, acc.num_processes)  # the prompt stream, RNG states and global batch depend on it
        check_algorithm(folder, self.config)
        state_path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(state_path):  # an earlier version pickled these states; they are never unpickled
            raise UserError(f"{folder} has no {STATE_FILE} (written by an earlier version of training_rl.py, which "
                            "pickled the run's state): start a new run, or resume with the version that wrote it")
        acc.load_state(folder)
        with open(state_path, encoding="utf-8") as f:
            saved = json.load(f)
        for name, obj in self._run_state().items():
            obj.load_state_dict(saved[name])

    def _save_weights_hook(self, models, weights, output_dir) -> None:
        """accelerate's save-state pre-hook (every process): the policy is written as an adapter (or full model)
        with its value head by ``save_model`` instead of accelerate's whole-model file, so a LoRA checkpoint holds
        the adapter only and is itself an adapter folder. Under DeepSpeed the engine has saved its shards; the
        gathered adapter is written next to them."""
        if weights:
            weights.pop()
        self.save_model(output_dir)

    def _load_weights_hook(self, models, input_dir) -> None:
        """accelerate's load-state pre-hook: load what ``_save_weights_hook`` wrote, strictly (a missing or
        unexpected key is an error). Under DeepSpeed ``models`` is empty: the engine loaded its shards."""
        if not models:
            return
        models.pop()
        load_policy_weights(self.accelerator.unwrap_model(self.model), input_dir)

    def save_model(self, folder: str) -> None:
        """The policy (adapter, or full model) and the value head, in safetensors. Every process calls it: under
        ZeRO-3 the full weights are gathered from all of them; the main process writes."""
        from safetensors.torch import save_file

        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # DDP / one process: the module's own state_dict, no copy
        if not acc.is_main_process:
            return
        os.makedirs(folder, exist_ok=True)
        part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        acc.unwrap_model(self.model).policy.save_pretrained(folder, state_dict=part("policy."))
        save_file({k: v.detach().cpu().contiguous() for k, v in part("value_head.").items()},
                  os.path.join(folder, VALUE_HEAD_FILE))


def check_algorithm(folder: str, config: PPOConfig) -> None:
    """Refuse a checkpoint written by another ``--algorithm`` or number of samples per prompt (its prompt stream,
    batch layout and weights mean something else); one before PPO's ``algorithm`` field counts as PPO's."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return  # not a complete checkpoint: what loads it says so
    saved = (state.get("algorithm", "ppo"), state.get("group_size", 1))
    if saved != (config.algorithm, config.group_size):
        raise UserError(f"{folder} was written by --algorithm {saved[0]} with {saved[1]} sample(s) per prompt; "
                        f"this run has --algorithm {config.algorithm} with {config.group_size}: "
                        "resume with the same settings, or start a new run")


def load_policy_weights(model, folder: str) -> None:
    """Load the adapter (or full model) and value head ``save_model`` wrote into ``model`` (a ``PolicyWithValueHead``,
    common/ppo.py); a key missing from the files or not in the model is a ``UserError`` naming it."""
    from safetensors.torch import load_file

    def check(missing, unexpected, what):
        if missing or unexpected:
            raise UserError(f"{folder}: the {what} does not match the model: missing {sorted(missing)[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}")

    head = load_file(os.path.join(folder, VALUE_HEAD_FILE))
    check(set(model.value_head.state_dict()) - set(head), set(head) - set(model.value_head.state_dict()), "value head")
    model.value_head.load_state_dict(head)
    policy = model.policy
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        expected = set(get_peft_model_state_dict(policy))
        check(expected - set(saved), set(saved) - expected, "adapter")
        set_peft_model_state_dict(policy, saved)
        return
    files = sorted(f for f in os.listdir(folder) if f.startswith("model") and f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{folder} holds neither an adapter nor model weights")
    saved = {}
    for name in files:
        saved.update(load_file(os.path.join(folder, name)))
    tied = set(getattr(policy, "all_tied_weights_keys", None) or {})
    own = set(policy.state_dict())
    check(own - set(saved) - tied, set(saved) - own, "model")
    policy.load_state_dict(saved, strict=False)
