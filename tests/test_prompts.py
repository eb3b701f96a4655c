"""The one template: SFT, reward model and PPO see byte-identical prefixes."""

from common.prompts import format_example, format_prompt, split_example


def test_template_text():
    assert format_example("How?", "Like this.") == "Question: How?\n\nAnswer: Like this."
    assert format_prompt("How?") == "Question: How?\n\nAnswer: "


def test_sft_text_and_ppo_prompt_share_the_prefix_byte_for_byte():
    question, answer = "Why does `git rebase` rewrite history?", "Because it replays commits:\n```\ngit rebase -i\n```"
    sft_text, ppo_prompt = format_example(question, answer), format_prompt(question)
    assert sft_text.encode().startswith(ppo_prompt.encode())
    assert sft_text.encode()[len(ppo_prompt.encode()):] == answer.encode()
    prompt, completion = split_example(question, answer)
    assert prompt == ppo_prompt and prompt + completion == sft_text


def test_sft_reward_model_and_ppo_tokenize_the_same_prefix_on_their_real_paths(tiny_model, tmp_path):
    """The token ids each stage really builds (training_sft.tokenize, training_reward_model.tokenize_pairs,
    training_rl.load_prompts), checked against the template written out by hand."""
    import json

    import training_reward_model
    import training_rl
    import training_sft
    from common.layouts import load_normalized, load_pairs
    from common.modeling import load_tokenizer

    rows = [{"question": "How do I sort a list in Python?", "response_j": "Use `sorted(items)` for a copy.",
             "response_k": "No idea."},
            {"question": "Why does `git rebase -i` say \"nothing to do\"?  ",
             "response_j": " Because:\n```\ngit log\n```",
             "response_k": "Reinstall git."},
            {"question": "Ünïcode in `café.txt`?\nSecond line.", "response_j": "Open it with encoding='utf-8'.",
             "response_k": "It is broken."}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    left, right = load_tokenizer(tiny_model, padding_side="left"), load_tokenizer(tiny_model, padding_side="right")
    prompts, dropped, _ = training_rl.load_prompts(training_rl.ScriptArguments(dataset_name=str(path), subset=""), left)
    sft = training_sft.tokenize(load_normalized("sft", str(path), "", "train")[0].dataset, right, False)
    script = training_reward_model.ScriptArguments(dataset_name=str(path))
    pairs, _ = training_reward_model.tokenize_pairs(load_pairs(str(path), "", "train", 0)[0], right, script, 512,
                                                    "test", verbose=False)
    assert dropped == 0 and len(prompts) == len(sft) == len(pairs) == 3
    for row, prompt, example, pair in zip(rows, prompts, sft, pairs):
        literal = "Question: " + row["question"] + "\n\nAnswer: "
        ids = prompt["input_ids"]
        assert right.decode(ids, skip_special_tokens=True) == literal
        assert example["input_ids"][: len(ids)] == ids  # SFT trains on exactly the prompt PPO generates from
        assert example["completion_mask"] == [0] * len(ids) + [1] * (len(example["input_ids"]) - len(ids))
        assert example["input_ids"][-1] == right.eos_token_id
        assert right.decode(example["input_ids"], skip_special_tokens=True) == literal + row["response_j"]
        for key, answer in (("chosen_ids", "response_j"), ("rejected_ids", "response_k")):  # what the RM scores
            assert right.decode(pair[key], skip_special_tokens=True) == literal + row[answer]
            assert pair[key][-1] == right.eos_token_id
