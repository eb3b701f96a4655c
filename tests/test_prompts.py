"""The one template: SFT, reward model and PPO see byte-identical prefixes."""

from common.prompts import format_example, format_prompt, split_example, tokenize_example, tokenize_prompt


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


def test_sft_tokens_start_with_the_ppo_prompt_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    question, answer = "How do I sort a list in Python?", "Use sorted(items) for a copy."
    example, prompt_ids = tokenize_example(tok, question, answer), tokenize_prompt(tok, question)
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["completion_mask"] == [0] * n + [1] * (len(example["input_ids"]) - n)
    assert example["input_ids"][-1] == tok.eos_token_id
    # what the policy is trained to continue is exactly the text PPO generates from
    assert tok.decode(example["input_ids"][:n], skip_special_tokens=True) == format_prompt(question)
    assert tok.decode(example["input_ids"], skip_special_tokens=True) == format_example(question, answer)
