"""The PPO trainer's model-facing parts on tiny random models: samples come from the distribution whose log-probs
are trained (whatever the model's generation_config says), log-probs go through the model's own output path
(Gemma-2 soft-capping), the value head reads the right positions, the loss is the same at any batch layout, and
checkpoints are replaced without a moment with none."""

import os
from types import SimpleNamespace

import pytest
import torch
from ppo_update_worker import PROMPTS, RESPONSES, run_update, tiny_policy

from common.generation import eos_token_ids, sample_responses
from common.ppo import PolicyWithValueHead, PPOTrainer
from common.ppo_math import position_ids_for, response_logprobs
from conftest import TORCHRUN, run_script


def _llama(**config_overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, vocab_size=50, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
    config = LlamaConfig(**{**settings, **config_overrides})
    return LlamaForCausalLM(config).eval()


def _with_value_head(lm):
    model = PolicyWithValueHead(lm).eval()
    torch.nn.init.normal_(model.value_head.weight, std=0.5)  # a zero head would pass any alignment check
    torch.nn.init.constant_(model.value_head.bias, 0.3)
    return model


def _collate(prompts, responses):
    fake = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0), accelerator=SimpleNamespace(device="cpu"))
    return PPOTrainer.collate(fake, [{"input_ids": p} for p in prompts], responses)


def _training_logprobs(model, prompts, responses, temperature=1.0):
    """Log-probs of each response under the training forward (the batch PPO builds), one list per response."""
    b = _collate(prompts, responses)
    with torch.no_grad():
        logits, _ = model(b["input_ids"], b["attention_mask"], b["position_ids"], b["P"])
        lp = response_logprobs(logits, b["responses"], temperature)
    return [row[: len(r)].tolist() for row, r in zip(lp, responses)]


# ----------------------------------------------------------------------------------------------------------------
# Alignment of logits, log-probs and values
# ----------------------------------------------------------------------------------------------------------------


def test_value_head_and_logits_are_read_at_the_positions_before_each_response_token():
    model = _with_value_head(_llama())
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 50, (2, 10), generator=g)
    attn = torch.ones_like(ids)
    P = 4
    with torch.no_grad():
        logits, values = model(ids, attn, position_ids_for(attn), response_start=P)
        full = model.policy(ids, attention_mask=attn, output_hidden_states=True)
    assert logits.shape == (2, 10 - P + 1, 50) and values.shape == (2, 10 - P)
    torch.testing.assert_close(logits, full.logits[:, P - 1 :], atol=1e-5, rtol=0)  # positions P-1 .. T-1
    hidden = full.hidden_states[-1][:, P - 1 : -1]  # the state before each response token (after the final norm)
    expected = (hidden @ model.value_head.weight.T).squeeze(-1) + 0.3
    assert expected.abs().min() > 1e-3  # a non-trivial value at every position
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    lp = response_logprobs(logits, ids[:, P:], 1.0)
    direct = torch.log_softmax(full.logits, -1)[:, P - 1 : -1].gather(-1, ids[:, P:, None]).squeeze(-1)
    torch.testing.assert_close(lp, direct, atol=1e-5, rtol=0)


def test_a_left_padded_row_gets_the_values_and_logprobs_it_gets_alone():
    model = _with_value_head(_llama())
    prompts, responses = [[1, 7, 8, 9, 10], [1, 11, 12]], [[20, 21, 22, 2], [30, 31]]
    b = _collate(prompts, responses)
    assert b["P"] == 5 and b["input_ids"][1].tolist() == [0, 0, 1, 11, 12, 30, 31, 0, 0]
    assert b["position_ids"][1].tolist()[2:7] == [0, 1, 2, 3, 4] and b["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with torch.no_grad():
        logits, values = model(b["input_ids"], b["attention_mask"], b["position_ids"], b["P"])
        lp = response_logprobs(logits, b["responses"], 1.0)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            ones = torch.ones_like(ids)
            alone_logits, alone_values = model(ids, ones, position_ids_for(ones), len(p))
            n = len(r)
            torch.testing.assert_close(values[row, :n], alone_values[0], atol=1e-5, rtol=0)
            alone = response_logprobs(alone_logits, ids[:, len(p):], 1.0)[0]
            torch.testing.assert_close(lp[row, :n], alone, atol=1e-5, rtol=0)


def test_the_trainer_forward_trims_padding_columns_without_changing_a_number():
    model = _with_value_head(_llama())
    trainer = SimpleNamespace(ref_model=None, config=SimpleNamespace(temperature=0.8))
    prompts, responses = [[1, 7, 8, 9, 10, 11], [1, 12, 13], [1, 14]], [[20, 2], [21, 22, 23, 24, 25], [26, 27, 2]]
    b = _collate(prompts, responses)
    with torch.no_grad():
        whole_logits, whole_values = model(b["input_ids"], b["attention_mask"], b["position_ids"], b["P"])
        whole = response_logprobs(whole_logits, b["responses"], 0.8)
        rows = torch.tensor([1, 2])  # their prompts leave 3 padding columns on the left; their longest response is 5
        values, logprobs, logits = PPOTrainer.forward(trainer, model, b, rows)
    assert logits.shape[1] == 5 + 1 and values.shape == logprobs.shape == (2, 5)
    mask = b["mask"][rows, :5]
    torch.testing.assert_close(values * mask, whole_values[rows, :5] * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs * mask, whole[rows, :5] * mask, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Samples come from the policy whose log-probs are trained
# ----------------------------------------------------------------------------------------------------------------


def test_sampling_ignores_the_models_generation_config_and_stops_at_every_eos():
    lm = _llama(eos_token_id=[2, 7])  # a list of EOS ids in the config, as Llama-3 has
    lm.generation_config.eos_token_id = [2, 7]
    lm.generation_config.repetition_penalty = 1.8
    lm.generation_config.suppress_tokens = list(range(3, 45))  # most of the vocabulary
    lm.generation_config.min_new_tokens = 6
    lm.generation_config.top_k, lm.generation_config.top_p = 3, 0.5
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    eos = eos_token_ids(tokenizer, lm)
    assert eos == [2, 7]
    torch.manual_seed(3)
    prompts = [[1, 5 + i, 9, 10 + i] for i in range(24)]
    responses, gen_logprobs = sample_responses(lm, prompts, 12, 1.0, eos, pad_id=0, return_logprobs=True)
    tokens = [t for r in responses for t in r]
    assert sum(3 <= t < 45 for t in tokens) > 0.5 * len(tokens)  # suppressed tokens are sampled as often as not
    assert any(len(r) < 6 for r in responses)  # min_new_tokens did not apply
    ends = [r[-1] for r in responses if len(r) < 12]
    assert 2 in ends and 7 in ends  # either EOS ends an answer ...
    assert all(t not in (2, 7) for r in responses for t in r[:-1])  # ... and nothing follows it
    training = _training_logprobs(_with_value_head(lm), prompts, responses)
    for gen, train in zip(gen_logprobs, training):
        torch.testing.assert_close(torch.tensor(gen), torch.tensor(train), atol=1e-5, rtol=0)
    # the same model sampled through its own generation_config would have drawn from another distribution
    assert lm.generation_config.repetition_penalty == 1.8  # the model's config is left as it was


def test_temperature_scales_the_sampled_and_the_trained_distribution_alike():
    lm = _llama()
    torch.manual_seed(4)
    prompts = [[1, 5, 9], [1, 6, 7, 8]]
    responses, gen_logprobs = sample_responses(lm, prompts, 8, 0.6, [2], pad_id=0, return_logprobs=True)
    policy = _with_value_head(lm)
    trained = _training_logprobs(policy, prompts, responses, 0.6)
    for gen, train in zip(gen_logprobs, trained):
        torch.testing.assert_close(torch.tensor(gen), torch.tensor(train), atol=1e-5, rtol=0)
    # and the temperature was applied: both sides ignoring it would agree at T = 1 as well
    at_one = _training_logprobs(policy, prompts, responses, 1.0)
    assert max(abs(a - b) for x, y in zip(trained, at_one) for a, b in zip(x, y)) > 1e-2  # measured 0.15


def test_gemma2_soft_capping_is_in_rollout_reference_and_training_log_probs():
    import copy

    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=2.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    lm = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(20)  # raw logits well past the cap, so capping them changes the log-probs
    torch.manual_seed(5)
    prompts = [[2, 10, 11, 12], [2, 13, 14]]
    responses, rollout = sample_responses(lm, prompts, 10, 1.0, [1], pad_id=0, return_logprobs=True)
    policy = _with_value_head(lm)
    training = _training_logprobs(policy, prompts, responses)
    ref_model = copy.deepcopy(lm)  # the full fine-tuning reference path of PPOTrainer.forward
    trainer = SimpleNamespace(ref_model=ref_model, config=SimpleNamespace(temperature=1.0))
    b = _collate(prompts, responses)
    with torch.no_grad():
        _, reference, _ = PPOTrainer.forward(trainer, policy, b, slice(None), ref=True)
        hidden = policy.policy.model(b["input_ids"], attention_mask=b["attention_mask"],
                                     position_ids=b["position_ids"]).last_hidden_state[:, b["P"] - 1 : -1]
        uncapped = torch.log_softmax(lm.lm_head(hidden), -1).gather(-1, b["responses"][..., None]).squeeze(-1)
    for i, r in enumerate(responses):
        n = len(r)
        torch.testing.assert_close(torch.tensor(rollout[i]), torch.tensor(training[i]), atol=1e-5, rtol=0)
        torch.testing.assert_close(reference[i, :n], torch.tensor(training[i]), atol=1e-5, rtol=0)
        assert (uncapped[i, :n] - torch.tensor(training[i])).abs().max() > 0.1  # skipping the cap would show


def _dropout_probabilities(model) -> dict[str, float]:
    """Every dropout probability in ``model``: each ``nn.Dropout``'s ``p`` (GPT-2's attention passes
    ``attn_dropout.p`` to SDPA; LoRA's dropouts are modules too) and attention dropout kept as a float (Llama)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            found[name] = module.p
        if isinstance(getattr(module, "attention_dropout", None), float):
            found[name + ".attention_dropout"] = module.attention_dropout
    return found


def _with_dropout(family: str, attn: str):
    """A tiny model with dropout 0.1 everywhere its family has one, and a LoRA adapter with lora_dropout 0.1 whose B is
    not zero (a zero B would leave the LoRA dropout without effect)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    if family == "gpt2":
        torch.manual_seed(0)
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=64, attn_pdrop=0.1,
                            resid_pdrop=0.1, embd_pdrop=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config._attn_implementation = attn
        lm, targets = GPT2LMHeadModel(config).eval(), ["c_attn", "c_proj"]
    else:
        lm, targets = _llama(attention_dropout=0.1, attn_implementation=attn), ["q_proj", "v_proj", "o_proj"]
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, target_modules=targets,
                      fan_in_fan_out=family == "gpt2")
    return get_peft_model(lm, lora)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_disable_dropout_sets_every_dropout_to_zero_so_training_sees_the_rollouts_log_probs(family, attn):
    """PPO samples in eval mode and trains in train mode: with any dropout left on, the training forward would see
    other log-probs than the rollout's for the same weights (training_rl.disable_dropout)."""
    from training_rl import disable_dropout

    policy = _with_dropout(family, attn)
    before = _dropout_probabilities(policy)
    assert any("lora_dropout" in n and p == 0.1 for n, p in before.items()), before
    kinds = ("attn_dropout", "resid_dropout", "drop") if family == "gpt2" else ("attention_dropout",)
    for kind in kinds:
        assert any(n.endswith(kind) and p == 0.1 for n, p in before.items()), (kind, before)
    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    policy.train()
    with torch.no_grad():
        assert not torch.equal(policy(ids).logits, policy(ids).logits)  # dropout is active before

    disable_dropout(policy)
    assert all(p == 0.0 for p in _dropout_probabilities(policy).values()), _dropout_probabilities(policy)
    policy.train()
    with torch.no_grad():
        first, second = policy(ids).logits, policy(ids).logits
    assert torch.equal(first, second)
    # The rollout (eval mode, as PPOTrainer.generate) against the training forward in train mode (as update()).
    model = _with_value_head(policy)
    torch.manual_seed(3)
    prompts = [[1, 5, 9, 11], [1, 6, 7]]
    responses, rollout = sample_responses(model.lm().eval(), prompts, 8, 1.0, [2], pad_id=0, return_logprobs=True)
    model.train()
    for gen, train in zip(rollout, _training_logprobs(model, prompts, responses)):
        torch.testing.assert_close(torch.tensor(gen), torch.tensor(train), atol=1e-5, rtol=0)


def _family_params():
    from test_architectures import FAMILIES

    return [pytest.param(name, spec, id=name) for name, spec in sorted(FAMILIES.items())]


@pytest.mark.parametrize("family, spec", _family_params())
def test_every_family_trains_on_the_log_probs_it_sampled_with_its_dropouts_configured(family, spec):
    """test_architectures' families with every dropout of their config at 0.1: the rollout (eval mode) and the
    training forward after disable_dropout (train mode, as PPO's update runs it) give the same log-probs, and an
    answer stops at each of the EOS ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from training_rl import disable_dropout

    spec = dict(spec)
    eos = [2, 7] if family == "llama_eos_list" else [2]
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=64, eos_token_id=eos, bos_token_id=1,
                                  pad_token_id=0, tie_word_embeddings=False, **spec)
    dropouts = [k for k, v in config.to_dict().items() if "drop" in k and k != "layerdrop" and isinstance(v, float)]
    for key in dropouts:
        setattr(config, key, 0.1)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    lm.generation_config.eos_token_id = eos
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(20)  # peaked distributions: a log-prob read elsewhere would differ
    assert eos_token_ids(SimpleNamespace(eos_token_id=2), lm) == eos
    disable_dropout(lm)
    model = _with_value_head(lm)
    torch.manual_seed(1)
    prompts = [[1, 5, 9, 11, 40], [1, 6, 7], [1, 30, 31, 32], [1, 50]]
    responses, rollout = sample_responses(lm, prompts, 12, 1.0, eos, pad_id=0, return_logprobs=True)
    assert all(t not in eos for r in responses for t in r[:-1])  # nothing after an EOS
    assert torch.tensor([x for row in rollout for x in row]).std() > 0.1  # measured 0.7 to 1.6 (OPT 0.2)
    model.train()
    for gen, train in zip(rollout, _training_logprobs(model, prompts, responses)):  # measured <= 1.5e-6 apart
        torch.testing.assert_close(torch.tensor(gen), torch.tensor(train), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# The loss at any batch layout
# ----------------------------------------------------------------------------------------------------------------


def _delta(weights, start):
    return {k: weights[k] - start[k] for k in start}


def test_responses_of_unequal_length_give_the_same_step_at_any_micro_batch_split():
    assert len({len(r) for r in RESPONSES}) == 4 and len({len(p) for p in PROMPTS}) == 4  # deliberately unequal
    start = tiny_policy().state_dict()
    raw_whole = run_update(mini=4, accum=1)
    whole = _delta(raw_whole, start)
    assert max(v.abs().max().item() for v in whole.values()) > 1e-3  # the step moved the weights
    # policy and value loss, approxkl, policy clipfrac: all non-zero (val/clipfrac is 0: values start at old_values)
    assert (raw_whole["stats"][:4].abs() > 1e-2).all(), raw_whole["stats"]
    for mini, accum in ((1, 4), (2, 2)):
        raw_split = run_update(mini=mini, accum=accum)
        split = _delta(raw_split, start)
        for k in whole:
            torch.testing.assert_close(split[k], whole[k], atol=1e-5, rtol=0, msg=f"mini {mini} x accum {accum}: {k}")
        # the statistics are token-weighted over the whole step too (measured within 1e-6)
        torch.testing.assert_close(raw_split["stats"], raw_whole["stats"], atol=1e-5, rtol=0,
                                   msg=f"mini {mini} x accum {accum}: stats")


@pytest.mark.parametrize("algorithm, loss_type", [("grpo", "token"), ("grpo", "grpo"), ("grpo", "dr_grpo"),
                                                  ("rloo", "grpo")])
def test_rloo_and_grpo_losses_give_the_same_step_at_any_micro_batch_split(algorithm, loss_type):
    start = tiny_policy().state_dict()
    whole = run_update(mini=4, accum=1, algorithm=algorithm, loss_type=loss_type)
    assert max((whole[k] - start[k]).abs().max().item() for k in start) > 1e-3
    assert all(torch.equal(whole[k], start[k]) for k in start if k.startswith("value_head"))  # no critic
    stats = whole["stats"]  # sorted keys: (loss/kl,) loss/policy, policy/approxkl, policy/clipfrac
    assert (stats.abs() > 1e-3).all(), stats
    for mini, accum in ((1, 4), (2, 2)):
        split = run_update(mini=mini, accum=accum, algorithm=algorithm, loss_type=loss_type)
        for k in start:
            torch.testing.assert_close(split[k] - start[k], whole[k] - start[k], atol=1e-5, rtol=0,
                                       msg=f"{algorithm}/{loss_type} mini {mini} x accum {accum}: {k}")
        torch.testing.assert_close(split["stats"], stats, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, loss_type", [("ppo", None), ("grpo", "grpo")])
def test_two_processes_with_accumulation_take_the_step_of_one_process_with_the_whole_batch(tmp_path, algorithm,
                                                                                             loss_type):
    start = tiny_policy().state_dict()
    one = run_update(mini=4, accum=1, algorithm=algorithm, loss_type=loss_type)
    out = tmp_path / "two.pt"
    extra = ["--algorithm", algorithm, *(["--loss_type", loss_type] if loss_type else [])]
    run_script(*TORCHRUN, "--master_port", "29581", "tests/ppo_update_worker.py", "--mini", "1", "--accum", "2",
               "--out", out, *extra, timeout=300)
    two = torch.load(out, weights_only=True)
    for k in start:
        torch.testing.assert_close(two[k] - start[k], one[k] - start[k], atol=1e-5, rtol=0, msg=k)
    torch.testing.assert_close(two["stats"], one["stats"], atol=1e-5, rtol=0)  # token-weighted over both processes


def test_deepspeed_auto_batch_fields_come_from_the_ppo_flags():
    from common.cli import UserError
    from common.ppo import PPOConfig
    from common.ppo_distributed import configure_deepspeed

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {}}
    hp = PPOConfig(mini_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=0.5)
    configure_deepspeed(config, hp)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    configure_deepspeed(config, hp)  # agrees
    with pytest.raises(UserError, match="gradient_accumulation_steps 4 but --gradient_accumulation_steps is 8"):
        configure_deepspeed(config, PPOConfig(mini_batch_size=2, gradient_accumulation_steps=8, max_grad_norm=0.5))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint(path, step, payload):
    os.makedirs(path)
    with open(os.path.join(path, "weights.txt"), "w") as f:
        f.write(payload)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write(f'{{"global_step": {step}}}')


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_checkpoint_never_leaves_a_moment_without_a_complete_one(tmp_path, monkeypatch, exchange):
    """Each rename `replace_folder` makes is cut short in turn (an exception as if the process died there): at every
    such point `latest` still finds a complete checkpoint-4, the old one or the new one."""
    import common.outputs as outputs
    from common.outputs import find_checkpoint, replace_folder

    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # the portable path: dst.old, then dst
    real_replace, real_rmtree = os.replace, outputs.shutil.rmtree
    crash_points = 4 if not exchange else 1  # the calls replace_folder makes to os.replace and shutil.rmtree
    seen = []
    for crash_at in range(crash_points + 1):
        root = tmp_path / f"run{crash_at}"
        _checkpoint(str(root / "checkpoint-4"), 4, "old")
        _checkpoint(str(root / "checkpoint-4.tmp"), 4, "new")
        calls = {"n": 0}

        def dying(fn, calls=calls, crash_at=crash_at):
            def wrapper(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] > crash_at:
                    raise KeyboardInterrupt("killed here")
                return fn(*args, **kwargs)
            return wrapper

        monkeypatch.setattr(outputs.os, "replace", dying(real_replace))
        monkeypatch.setattr(outputs.shutil, "rmtree", dying(real_rmtree))
        try:
            replace_folder(str(root / "checkpoint-4.tmp"), str(root / "checkpoint-4"))
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(outputs.os, "replace", real_replace)
        monkeypatch.setattr(outputs.shutil, "rmtree", real_rmtree)
        found = find_checkpoint(str(root), "latest")
        with open(os.path.join(found, "weights.txt")) as f:
            seen.append(f.read())
    assert seen[-1] == "new" and set(seen) <= {"old", "new"}
    assert sorted(os.listdir(tmp_path / f"run{crash_points}")) == ["checkpoint-4"]  # nothing left over at the end


def test_fsdp_is_refused_with_a_message_that_names_what_to_use_instead():
    from common.cli import UserError
    from common.ppo_distributed import check_supported

    for name, refused in (("FSDP", True), ("DEEPSPEED", False), ("MULTI_CPU", False), ("NO", False)):
        accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name=name))
        if refused:
            with pytest.raises(UserError, match="FSDP.*DeepSpeed ZeRO-3"):
                check_supported(accelerator)
        else:
            check_supported(accelerator)
