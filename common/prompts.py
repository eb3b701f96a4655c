"""The one prompt template every stage uses.

SFT trains on ``Question: {question}\n\nAnswer: {answer}``, the reward model scores the same text, and PPO
generates after ``Question: {question}\n\nAnswer: ``. If these drift apart, the policy is trained on one format
and rewarded on another, which silently ruins results, so the template lives here only.
"""

TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


def format_example(question: str, answer: str) -> str:
    """Full text of a question and its answer, as SFT trains on it and the reward model scores it."""
    return TEMPLATE.format(question=question, answer=answer)


def format_prompt(question: str) -> str:
    """The prompt PPO generates from: the example text with an empty answer (ends with ``Answer: ``)."""
    return format_example(question, "")


def split_example(question: str, answer: str) -> tuple[str, str]:
    """(prompt, completion) whose concatenation is exactly ``format_example(question, answer)``."""
    prompt = format_prompt(question)
    return prompt, answer


def tokenize_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of the PPO prompt: exactly what SFT puts before the answer (special tokens such as BOS included)."""
    return tokenizer(format_prompt(question))["input_ids"]


def tokenize_example(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """SFT tokens: the prompt's ids, then the answer's, then EOS, with a mask that is 1 on the answer and EOS.

    The prompt and answer are tokenized apart, so the prompt's ids are those PPO generates from byte for byte
    (a byte-level BPE would otherwise merge the trailing space of ``Answer: `` into the answer's first word,
    and the policy would be trained on a context it never sees when generating).
    """
    prompt_ids = tokenize_prompt(tokenizer, question)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)}
