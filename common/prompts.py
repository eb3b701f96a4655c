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


# ---------------------------------------------------------------------------------------------- conversations
# Conversational rows (lists of {"role", "content"} messages, TRL's conversational format) are rendered through the
# tokenizer's chat template when it has one; otherwise through this project's template, one turn at a time: a user
# turn as the prompt above (`Question: ...\n\nAnswer: `), an assistant turn as its text, any other turn (system,
# tool) as its text and a blank line. A single question and answer then read exactly as the StackLLaMA layout does.
# Every stage renders through these functions, so SFT trains, the reward model scores and PPO samples one layout.

ROLES = ("system", "developer", "user", "assistant", "tool")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_name(tokenizer) -> str:
    """Which template conversational rows go through, for the data log line."""
    if has_chat_template(tokenizer):
        return "the tokenizer's chat template"
    return "the project's prompt template (the tokenizer has no chat template)"


def _project_conversation(messages: list[dict]) -> str:
    text = ""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            text += format_prompt(m["content"])
        elif m["role"] == "assistant":
            text += m["content"] + ("\n\n" if i + 1 < len(messages) else "")
        else:
            text += m["content"] + "\n\n"
    return text


def render_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The text of ``messages``; ``add_generation_prompt`` ends it with the cue for the assistant's next turn."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _project_conversation(messages)  # a user turn ends with the cue already


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The text a model answers: a string prompt as it is (the StackLLaMA layout's is ``format_prompt(question)``),
    a conversation rendered with the cue for the assistant's turn."""
    return prompt if isinstance(prompt, str) else render_conversation(tokenizer, prompt, True)


def render_answer(tokenizer, prompt: str | list[dict], answer: str) -> str:
    """The whole text of ``prompt`` answered by ``answer`` (a generated string), as the reward model scores it: the
    same text as a training pair whose completion is that answer."""
    if isinstance(prompt, str):
        return prompt + answer
    return render_conversation(tokenizer, list(prompt) + [{"role": "assistant", "content": answer}], False)


class TemplateError(ValueError):
    """A chat template that does not render a conversation's start as the start of the whole conversation."""


def conversation_segments(tokenizer, messages: list[dict], trained_from: int,
                          assistant_only: bool) -> list[tuple[str, bool]]:
    """The text of ``messages`` in consecutive pieces ``(text, trained)``: each assistant turn is a piece of its own,
    trained if it is at index ``trained_from`` or later (the completion) or ``assistant_only`` is set; everything
    between assistant turns (other roles, the template's markup) is never trained. The pieces join to
    ``render_conversation(messages, add_generation_prompt=False)``."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_conversation(tokenizer, messages[:i], True) if i else ""
        through = render_conversation(tokenizer, messages[: i + 1], False)
        if not before.startswith(done) or not through.startswith(before):
            raise TemplateError("the chat template does not render the start of a conversation as the start of the "
                                "whole conversation, so its turns cannot be told apart")
        pieces += [(before[len(done):], False), (through[len(before):], assistant_only or i >= trained_from)]
        done = through
    rest = render_conversation(tokenizer, messages, False)
    if not rest.startswith(done):
        raise TemplateError("the chat template does not render the start of a conversation as the start of the "
                            "whole conversation, so its turns cannot be told apart")
    pieces.append((rest[len(done):], False))
    return [(text, trained) for text, trained in pieces if text]


def encode(tokenizer, text: str, first: bool = True) -> list[int]:
    """Token ids of ``text``: with the tokenizer's special tokens (BOS) when it starts a sequence, unless the text
    carries its BOS already (chat templates often write it)."""
    bos = tokenizer.bos_token
    special = first and not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def ends_with_eos(tokenizer, text: str) -> bool:
    """Whether ``text`` ends with the EOS token already (a chat template's end of turn may be it)."""
    eos = tokenizer.eos_token
    return bool(eos) and text.rstrip().endswith(eos)


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]]) -> dict[str, list[int]]:
    """``input_ids`` and a ``completion_mask`` (1 on trained pieces) of consecutive text pieces, each tokenized apart
    (the first with special tokens), then EOS (trained) unless the text ends with it: how SFT and DPO tokenize every
    layout. For the StackLLaMA layout this is ``tokenize_example``."""
    ids, mask = [], []
    for i, (text, trained) in enumerate(segments):
        piece = encode(tokenizer, text, first=i == 0)
        ids += piece
        mask += [int(trained)] * len(piece)
    if not segments or not ends_with_eos(tokenizer, segments[-1][0]):
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return {"input_ids": ids, "completion_mask": mask}
