"""The data layouts each stage reads, detected from a file's columns, checked row by row, and mapped onto one form.

Besides StackLLaMA's columns (the default, which win whenever they are present), every stage reads the layouts of
TRL's dataset docs, in the standard form (strings) and the conversational form (lists of ``{"role", "content"}``
messages):

| kind | layout | columns |
| --- | --- | --- |
| ``sft`` (SFT) | ``stackllama`` | ``question``, ``response_j`` |
| | ``prompt-completion`` | ``prompt``, ``completion`` |
| | ``messages`` | ``messages`` (conversational only) |
| | ``text`` | ``text`` (standard only) |
| ``pairs`` (reward model, DPO) | ``stackllama`` | ``question``, ``response_j``, ``response_k`` |
| | ``preference`` | ``prompt``, ``chosen``, ``rejected`` |
| | ``implicit-prompt preference`` | ``chosen``, ``rejected`` (the prompt is their shared start) |
| ``prompts`` (PPO, RLOO, GRPO, evaluate) | ``stackllama`` | ``question`` |
| | ``prompt`` | ``prompt`` |

``--columns`` maps a layout's column names onto a file's (``--columns prompt=instruction completion=output``); the
layout is then the one those names belong to. Other columns are kept (``pair_kind``, ``answer_key``, ...).

After ``normalize`` every row has the same fields, whatever its layout: ``prompt`` (the literal text before the
answer, a string, or a conversation), the answer(s) (``completion``, or ``chosen`` and ``rejected``: strings, or lists
of assistant messages) and ``question`` (readable text of the prompt, for reports and the gold judge). A StackLLaMA
``question`` becomes the prompt ``Question: {question}\\n\\nAnswer: `` (common/prompts.py); a standard ``prompt`` is
taken as it is, as TRL takes it. The text of a row is then made by ``common.prompts`` (``render_prompt``,
``render_answer``, ``completion_text``), the same way in every stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import datasets

from common.data import DataError, LoadedSplit, checked_stream, load_split, str_problem, validate_rows
from common.prompts import ROLES, TemplateError, format_prompt, render_conversation, render_prompt

STACKLLAMA = "stackllama"


@dataclass(frozen=True)
class Spec:
    """A layout: its name and its columns, each with the role it plays (``question`` is StackLLaMA's prompt)."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (column, role)

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]


SPECS = {
    "sft": (
        Spec(STACKLLAMA, (("question", "question"), ("response_j", "completion"))),
        Spec("prompt-completion", (("prompt", "prompt"), ("completion", "completion"))),
        Spec("messages", (("messages", "messages"),)),
        Spec("text", (("text", "text"),)),
    ),
    "pairs": (
        Spec(STACKLLAMA, (("question", "question"), ("response_j", "chosen"), ("response_k", "rejected"))),
        Spec("preference", (("prompt", "prompt"), ("chosen", "chosen"), ("rejected", "rejected"))),
        Spec("implicit-prompt preference", (("chosen", "chosen"), ("rejected", "rejected"))),
    ),
    "prompts": (
        Spec(STACKLLAMA, (("question", "question"),)),
        Spec("prompt", (("prompt", "prompt"),)),
    ),
}
NORMALIZED = {"sft": ("prompt", "completion", "question"), "pairs": ("prompt", "chosen", "rejected", "question"),
              "prompts": ("prompt", "question")}
ALWAYS_STANDARD = {"question", "text"}  # roles that are strings in every form
COLUMNS_HELP = ("Map the layout's column names onto your file's, as NAME=COLUMN pairs (--columns prompt=instruction "
                "completion=output). Default: the layout is detected from the columns (StackLLaMA's question / "
                "response_j / response_k; prompt / completion, messages, text; prompt / chosen / rejected; prompt).")


def columns_field():
    """The ``--columns`` flag, declared once for every stage's arguments."""
    return dataclasses.field(default=None, metadata={"help": COLUMNS_HELP})


@dataclass
class Layout:
    """A detected layout: which spec, which file column plays each role, and whether rows are conversations."""

    spec: Spec
    columns: dict[str, str]  # role -> the file's column
    conversational: bool

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self, tokenizer=None) -> str:
        form = "conversational" if self.conversational else "standard"
        cols = ", ".join(self.columns.values())
        rendered = ""
        if self.conversational and tokenizer is not None:
            from common.prompts import template_name

            rendered = f"; conversations rendered with {template_name(tokenizer)}"
        return f"layout '{self.name}' ({form}; columns {cols}){rendered}"


def parse_columns(pairs: list[str] | dict | None) -> dict[str, str]:
    """``["prompt=instruction", ...]`` -> ``{"prompt": "instruction"}``; a malformed pair is a one-line error."""
    if isinstance(pairs, dict):  # from a YAML config
        pairs = [f"{k}={v}" for k, v in pairs.items()]
    mapping = {}
    for pair in pairs or []:
        name, sep, column = pair.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise DataError(f"--columns {pair}: expected NAME=COLUMN, e.g. --columns prompt=instruction")
        mapping[name.strip()] = column.strip()
    return mapping


def _accepted(kind: str) -> str:
    return "; ".join(f"{s.name} ({', '.join(s.names)})" for s in SPECS[kind])


def detect(kind: str, found: list[str], mapping: dict[str, str], source: str) -> tuple[Spec, dict[str, str]]:
    """The layout of a file with columns ``found``: the one spec whose (mapped) columns are all there. StackLLaMA's
    wins when present; among the others the most specific (``prompt``/``chosen``/``rejected`` over
    ``chosen``/``rejected``); two that remain are ambiguous. Errors list the columns and the accepted layouts."""
    specs = SPECS[kind]
    known = sorted({c for s in specs for c in s.names})
    for name, column in mapping.items():
        if name not in known:
            raise DataError(f"--columns {name}={column}: '{name}' is not a column name of these layouts: "
                            f"{_accepted(kind)}")
        if column not in found:
            raise DataError(f"--columns {name}={column}: {source} has no column '{column}'; columns found: "
                            f"{', '.join(found) or '(none)'}")
    matches = []
    for spec in specs:
        if not set(mapping) <= set(spec.names):
            continue
        cols = {role: mapping.get(col, col) for col, role in spec.columns}
        if all(c in found for c in cols.values()):
            matches.append((spec, cols))
    if any(spec.name == STACKLLAMA for spec, _ in matches):
        matches = [m for m in matches if m[0].name == STACKLLAMA]
    matches = [m for m in matches if not any(set(m[1].values()) < set(o[1].values()) for o in matches)]
    if len(matches) == 1:
        return matches[0]
    columns = ", ".join(found) or "(none)"
    if not matches:
        raise DataError(f"{source}: no known data layout in its columns ({columns}); accepted layouts: "
                        f"{_accepted(kind)}. Map other names with --columns, e.g. --columns prompt=instruction")
    raise DataError(f"{source}: ambiguous data layout: its columns ({columns}) fit "
                    f"{' and '.join(m[0].name for m in matches)}; accepted layouts: {_accepted(kind)}. Choose with "
                    f"--columns (e.g. --columns {matches[0][0].names[0]}={matches[0][0].names[0]})")


# ---------------------------------------------------------------------------------------------- row checks


def message_problems(value, column: str) -> list[str]:
    """What is wrong with a conversation value (a non-empty list of messages with a known role and text)."""
    if value is None:
        return [f"field '{column}' is null"]
    if isinstance(value, str):
        return [f"field '{column}' is a string, not a list of messages (the other rows are conversations)"]
    if not isinstance(value, list):
        return [f"field '{column}' is a {type(value).__name__}, not a list of messages"]
    if not value:
        return [f"field '{column}' is an empty list of messages"]
    problems = []
    for turn, m in enumerate(value, start=1):
        where = f"field '{column}', message {turn}"
        if not isinstance(m, dict):
            problems.append(f"{where} is a {type(m).__name__}, not a mapping with 'role' and 'content'")
            continue
        if m.get("role") not in ROLES:
            problems.append(f"{where}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
        if (p := str_problem(m.get("content"), "content")) is not None:
            problems.append(f"{where}: {p.replace('field ', '', 1)}")
    return problems


def _shared_start(a: list | str, b: list | str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_implicit(chosen, rejected):
    """(prompt, chosen answer, rejected answer) of an implicit-prompt pair: the prompt is the shared first messages
    (conversations), or the shared start up to its last whitespace (strings, so no word is split)."""
    n = _shared_start(chosen, rejected)
    if isinstance(chosen, str):
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _structure_problems(layout: Layout, row: dict) -> list[str]:
    cols, name = layout.columns, layout.name
    if name == "messages":
        if row[cols["messages"]][-1].get("role") != "assistant":
            return [f"field '{cols['messages']}': the last message is not the assistant's (nothing to learn)"]
        return []
    if not layout.conversational:
        if name == "implicit-prompt preference":
            prompt, c, r = split_implicit(row[cols["chosen"]], row[cols["rejected"]])
            if not prompt.strip() or not c.strip() or not r.strip() or c == r:
                return [f"fields '{cols['chosen']}' and '{cols['rejected']}' share no prompt, or one is the other's "
                        "start (an implicit-prompt pair is a shared prompt and two different answers)"]
        return []
    problems = []
    for role in ("completion", "chosen", "rejected"):
        if role in cols and "prompt" in cols and row[cols[role]][0].get("role") != "assistant":
            problems.append(f"field '{cols[role]}' does not start with an assistant message")
    if "prompt" in cols and row[cols["prompt"]][-1].get("role") == "assistant" and name == "prompt":
        problems.append(f"field '{cols['prompt']}' ends with an assistant message (the model answers the prompt)")
    if name == "implicit-prompt preference":
        prompt, c, r = split_implicit(row[cols["chosen"]], row[cols["rejected"]])
        if not prompt or not c or not r:
            problems.append(f"fields '{cols['chosen']}' and '{cols['rejected']}' share no first messages, or one is "
                            "the other's start (an implicit-prompt pair is shared messages and two different answers)")
        elif c[0].get("role") != "assistant" or r[0].get("role") != "assistant":
            problems.append(f"fields '{cols['chosen']}' and '{cols['rejected']}' differ before an assistant message")
    return problems


def row_problems(layout: Layout, row: dict) -> list[str]:
    """Every problem of one row for ``layout``: a missing, null, empty or mistyped value, a malformed message, a
    conversation that does not fit its role."""
    problems = []
    for role, column in layout.columns.items():
        if layout.conversational and role not in ALWAYS_STANDARD:
            problems += message_problems(row.get(column), column)
        elif (p := str_problem(row.get(column), column)) is not None:
            problems.append(p)
    return problems or _structure_problems(layout, row)


# ---------------------------------------------------------------------------------------------- loading


def _first_row(ds) -> dict | None:
    return next(iter(ds.take(1)), None) if isinstance(ds, datasets.IterableDataset) else (ds[0] if len(ds) else None)


def load_layout(kind: str, dataset_name: str, data_dir: str | None, split: str, columns: list[str] | None = None,
                *, streaming: bool = False) -> tuple[LoadedSplit, Layout]:
    """Load a split, detect its layout (``kind``: sft, pairs or prompts) and check every row (a stream: its first
    rows here, every later row as it is read), before any model is loaded. Errors name the file, row and field."""
    loaded = load_split(dataset_name, data_dir, split, streaming)
    ds = loaded.dataset
    found = list(ds.column_names) if ds.column_names is not None else list(_first_row(ds) or {})
    spec, cols = detect(kind, found, parse_columns(columns), loaded.source)
    first = _first_row(ds) or {}
    if spec.name == "text" and isinstance(first.get(cols["text"]), list):  # a text column of conversations
        spec, cols = next(s for s in SPECS[kind] if s.name == "messages"), {"messages": cols["text"]}
    values = [first.get(c) for role, c in cols.items() if role not in ALWAYS_STANDARD]
    conversational = any(isinstance(v, list) for v in values)
    if spec.name == "messages" and not conversational and values and values[0] is not None:
        raise DataError(f"{loaded.source}: column '{cols['messages']}' holds {type(values[0]).__name__}s, not lists "
                        "of messages")
    layout = Layout(spec, cols, conversational or spec.name == "messages")
    fields = list(cols.values())
    validate_rows(loaded, fields, lambda row: row_problems(layout, row))
    if streaming:
        loaded.dataset = checked_stream(loaded, fields, lambda row: row_problems(layout, row))
    return loaded, layout


def _display(prompt) -> str:
    """Readable text of a prompt: a string as it is, a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else "\n\n".join(m["content"] for m in prompt)


def _messages(value):
    return [{"role": m["role"], "content": m["content"]} for m in value] if isinstance(value, list) else value


def normalize_row(layout: Layout, row: dict) -> dict:
    """One row in the normalized form of its kind (module docstring)."""
    cols, name = layout.columns, layout.name
    get = {role: _messages(row[col]) for role, col in cols.items()}
    if "question" in get:
        out = {"prompt": format_prompt(get["question"]), "question": get["question"]}
    elif name == "messages":
        conversation = get["messages"]
        out = {"prompt": conversation[:-1], "completion": conversation[-1:]}
    elif name == "text":
        out = {"prompt": "", "completion": get["text"]}
    elif name == "implicit-prompt preference":
        prompt, chosen, rejected = split_implicit(get["chosen"], get["rejected"])
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        out = {"prompt": get["prompt"]}
    for role in ("completion", "chosen", "rejected"):
        if role in get and role not in out:
            out[role] = get[role]
    out.setdefault("question", _display(out["prompt"]))
    return out


def normalize(kind: str, ds, layout: Layout):
    """The data set in the normalized form of ``kind`` (``prompt``, the answers, ``question``), other columns kept
    unless a normalized field takes their name."""
    fields = NORMALIZED[kind]
    names = ds.column_names if ds.column_names is not None else None
    drop = [c for c in names if c in layout.columns.values() or c in fields] if names is not None else None
    if drop is None:  # a stream without known columns: the mapped row replaces the layout's columns
        return ds.map(lambda row: {**{k: v for k, v in row.items() if k not in layout.columns.values()},
                                   **normalize_row(layout, row)})
    with _quiet():  # a renaming pass, no progress bar of its own
        return ds.map(lambda row: normalize_row(layout, row), remove_columns=drop)


@contextlib.contextmanager
def _quiet():
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def completion_text(tokenizer, prompt, completion) -> str:
    """The text that follows ``render_prompt(prompt)`` for ``completion`` (a string, or assistant messages rendered
    with the rest of the conversation)."""
    if isinstance(completion, str):
        return completion
    start = render_prompt(tokenizer, prompt)
    whole = render_conversation(tokenizer, list(prompt) + list(completion), False)
    if not whole.startswith(start):
        raise TemplateError("the chat template does not render the prompt as the start of the conversation")
    return whole[len(start):]


def answer_display(value) -> str:
    """Readable text of an answer (for reports): a string as it is, assistant messages' text."""
    return value if isinstance(value, str) else "\n\n".join(m["content"] for m in value)


def load_normalized(kind: str, dataset_name: str, data_dir: str | None, split: str, columns: list[str] | None = None,
                    *, streaming: bool = False) -> tuple[LoadedSplit, Layout]:
    """``load_layout`` then ``normalize``: the loaded split's dataset is replaced by its normalized form."""
    loaded, layout = load_layout(kind, dataset_name, data_dir, split, columns, streaming=streaming)
    loaded.dataset = normalize(kind, loaded.dataset, layout)
    return loaded, layout



def load_pairs(dataset_name: str, data_dir: str | None, split: str, subset: int, columns: list[str] | None = None):
    """The first ``subset`` preference pairs (``<= 0``: all) of a split, checked and normalized (``prompt``,
    ``chosen``, ``rejected``, ``question``), and their layout: the reward model's and DPO's training and evaluation
    rows."""
    loaded, layout = load_layout("pairs", dataset_name, data_dir, split, columns)
    ds = loaded.dataset
    ds = ds.select(range(subset)) if 0 < subset < len(ds) else ds
    return normalize("pairs", ds, layout), layout
