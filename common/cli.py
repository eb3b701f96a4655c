"""Command-line plumbing shared by the scripts: argument parsing with StackLLaMA aliases and ``--config`` YAML, the
one place where a user mistake becomes a one-line message instead of a traceback, and the Python entries' keyword
arguments, parsed by the same parser as the flags (``parse_args(..., kwargs=...)``) so they are validated the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable

import yaml

from common.errors import UserError


@dataclasses.dataclass
class StageResult:
    """What a stage's Python entry returns: the folder it wrote and the final metrics of its model card (the
    ``README.md`` it writes there; empty on processes other than the main one). ``results`` holds a stage's whole
    results where it has more than the card's figures (evaluate: what ``eval.json`` holds)."""

    output_dir: str
    metrics: dict
    results: dict | None = dataclasses.field(default=None, repr=False)


def call_stage(entry: str, parse: Callable[..., tuple], main: Callable[..., StageResult], kwargs: dict) -> StageResult:
    """A stage's Python entry: ``kwargs`` parsed as the flags (``parse(kwargs=...)``), then ``main``. While it runs,
    the call is what ``run_args.yaml`` and the model card record as the command (a notebook's ``sys.argv`` is the
    kernel's). A ``UserError`` propagates to the caller; nothing exits the process."""
    from common.outputs import invoked_as

    with invoked_as(f"{entry}(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"):
        return main(*parse(kwargs=kwargs))


def run(main: Callable[..., object], *args) -> None:
    """Call ``main(*args)``; a ``UserError`` is printed without a traceback and exits with status 2; Ctrl-C (SIGINT)
    or SIGTERM ends with one line saying how far the stage got and how to continue (``common.interrupt``), exit
    status 130 or 143.

    The command line's end: a process group the stage joined (torchrun) is left before the interpreter exits, since
    a gloo group torn down by interpreter shutdown can abort the process after the work is done."""
    import signal

    from common import interrupt

    interrupt.install()
    try:
        main(*args)
        interrupt.finished()  # a signal now would only cut the exit short
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (KeyboardInterrupt, interrupt.Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if interrupt.is_main_process():
            from common.outputs import command_line

            print(f"\n{interrupt.message(signum, command_line())}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "y", "on"):
        return True
    if value.lower() in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: each flag's default, and the script's docstring with its own line breaks (commands stay
    commands)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``UserError`` instead of exiting, so every flag error reads the same way."""

    def error(self, message: str):  # noqa: D102  (argparse's hook)
        raise UserError(f"{message} (see --help)")


def parse_args(
    dataclass_types: Iterable[type],
    aliases: dict[str, str] | None = None,
    defaults: dict[str, object] | None = None,
    args: list[str] | None = None,
    description: str | None = None,
    *, kwargs: dict | None = None,
    hints: dict[str, str] | None = None,
) -> tuple:
    """Parse ``args`` (default ``sys.argv[1:]``) into one instance of each dataclass.

    - ``aliases`` maps an extra flag (``"--model_path"``) to a field name (``"model_name_or_path"``); both
      spellings work on the command line and as YAML keys, and ``--help`` lists them together.
    - ``defaults`` overrides the dataclasses' defaults (the historical StackLLaMA values).
    - ``--config run.yaml`` sets defaults from a YAML mapping; flags on the command line override it. An
      unknown key in the YAML is an error, as an unknown flag is.
    - ``kwargs`` (a Python entry's keyword arguments; ``args`` then defaults to none, never ``sys.argv``): each
      ``name=value`` becomes the flag ``--name`` with ``value`` written as on a command line (lists as several
      values, enums by value), so types, choices and aliases are checked as the flags are; ``config=`` is
      ``--config``; ``None`` sets the field to None, over the YAML too.
    - An unknown flag is answered with the nearest known ones, or with ``hints[flag]`` (another script's name for
      the same thing: PPO's ``--steps`` for ``--max_steps``). A YAML value of the wrong type names the file and key.
    """
    parser, aliases = build_parser(dataclass_types, aliases, defaults, description)
    nones = set()  # fields a keyword set to None
    if kwargs is not None:
        args, nones = _kwargs_as_flags(parser, kwargs, list(args or []))
    args = list(sys.argv[1:] if args is None else args)
    config_path = _pop_config(args)
    if config_path:
        _apply_config(parser, config_path, aliases)
    for action in parser._actions:
        if action.dest in nones:
            action.default, action.required = None, False
    namespace, remaining = parser.parse_known_args(args)
    if remaining:
        raise UserError(f"unrecognized arguments: {' '.join(remaining)}{_suggestions(parser, remaining, hints)} "
                        "(see --help)")
    _check_before_validation(namespace)
    outputs = []
    for dtype in parser.dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        values = {k: v for k, v in vars(namespace).items() if k in keys}
        try:
            outputs.append(dtype(**values))
        except (ValueError, TypeError, ImportError) as e:  # a library config's own validation (e.g. TrainingArguments)
            raise UserError(str(e)) from e
    return tuple(outputs)


def build_parser(dataclass_types: Iterable[type], aliases: dict[str, str] | None = None,
                 defaults: dict[str, object] | None = None, description: str | None = None):
    """The parser ``parse_args`` parses with (its actions are the flags ``--help`` lists; scripts/audit_flags.py
    walks them), and every alias, the renamed fields' included."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        error = ArgumentParser.error  # raise UserError instead of exiting

    # allow_abbrev=False: a typo is an error, not a prefix; the description (a script's docstring) keeps its lines
    parser = Parser(list(dataclass_types), description=description, allow_abbrev=False, formatter_class=HelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML file of argument defaults; command-line flags override it.")
    _accept_none(parser, dataclass_types)
    _bare_booleans(parser)
    _structured_values(parser, dataclass_types)
    aliases = {**_renamed_fields(parser), **(aliases or {})}
    for alias, dest in aliases.items():
        action = next((a for a in parser._actions if a.dest == dest), None)
        assert action is not None, f"alias {alias} targets unknown field {dest}"
        action.option_strings.append(alias)
        parser._option_string_actions[alias] = action
    if defaults:
        unknown = set(defaults) - {a.dest for a in parser._actions}
        assert not unknown, f"defaults for unknown fields {unknown}"
        parser.set_defaults(**defaults)
    return parser, aliases


def _check_before_validation(namespace) -> None:
    """Flags that a library config rejects while it is built (``TrainingArguments.__post_init__``) with a message
    that names neither the flag nor the fix: a ``--deepspeed`` file that is not there, and ``--ddp_backend`` in a
    plain python run (accelerate then asks torch for a process group that was never formed)."""
    deepspeed = getattr(namespace, "deepspeed", None)
    if isinstance(deepspeed, str) and not deepspeed.lstrip().startswith("{") and not os.path.isfile(deepspeed) and \
            (deepspeed.endswith(".json") or os.sep in deepspeed):
        raise UserError(f"--deepspeed {deepspeed}: no such file (a DeepSpeed JSON config)")
    if getattr(namespace, "ddp_backend", None) and "LOCAL_RANK" not in os.environ:
        raise UserError(f"--ddp_backend {namespace.ddp_backend} is for several processes started by a launcher "
                        "(torchrun --nproc_per_node N, accelerate launch); a plain python run needs none: drop it")


def _kwargs_as_flags(parser, kwargs: dict, args: list[str]) -> tuple[list[str], set[str]]:
    """``args`` followed by each keyword argument written as its flag, and the fields a keyword set to None."""
    nones = set()
    for name, value in kwargs.items():
        action = parser._option_string_actions.get(f"--{name}")
        if action is None:
            raise UserError(f"unknown argument {name!r}: the keyword arguments are the command-line flags "
                            "without their dashes (see --help)")
        if value is None:
            nones.add(action.dest)
        elif action.nargs in ("+", "*"):
            if isinstance(value, dict):  # a mapping flag (--columns NAME=COLUMN ...)
                value = [f"{k}={v}" for k, v in value.items()]
            values = [value] if isinstance(value, str) else list(value)
            args += [f"--{name}", *map(_flag_text, values)]
        elif isinstance(value, (list, tuple, set)):
            raise UserError(f"argument {name} takes one value, got {type(value).__name__} {value!r}")
        else:
            args.append(f"--{name}={_flag_text(value)}")
    return args, nones


def _apply_config(parser, config_path: str, aliases: dict[str, str]) -> None:
    """The YAML mapping in ``config_path`` as the parser's defaults; an unknown key or a value of the wrong type is
    a ``UserError`` naming the file."""
    if not os.path.isfile(config_path):
        raise UserError(f"--config {config_path}: no such file")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {config_path} is not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise UserError(f"--config {config_path} must hold a mapping of argument names to values")
    alias_dest = {a.lstrip("-"): d for a, d in aliases.items()}
    config = {alias_dest.get(k, k): v for k, v in config.items()}
    unknown = sorted(k for k in config if k not in {a.dest for a in parser._actions})
    if unknown:
        raise UserError(f"--config {config_path}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)}")
    for action in parser._actions:
        if action.dest in config:
            _check_yaml_value(config_path, action, config[action.dest])
            action.default = config[action.dest]
            action.required = False


def _suggestions(parser, remaining: list[str], hints: dict[str, str] | None) -> str:
    """``; did you mean --x?`` for the unknown flags among ``remaining`` (values are skipped)."""
    import difflib

    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    known = sorted(o for o in options if "-" not in o[2:] or "--" + o[2:].replace("-", "_") not in options)
    notes = []
    for flag in (r.split("=", 1)[0] for r in remaining if r.startswith("--")):
        if hints and flag in hints:
            notes.append(f"{flag}: {hints[flag]}")
        elif close := difflib.get_close_matches(flag, known, n=3, cutoff=0.6):
            notes.append(f"{flag}: did you mean {' or '.join(close)}?")
    return "; " + "; ".join(notes) if notes else ""


def _check_yaml_value(path: str, action, value) -> None:
    """A ``--config`` value parsed as its flag's would be, so that a wrong type is an error naming the file and key
    (argparse converts string defaults only, and names neither)."""
    if value is None or isinstance(value, dict):
        return
    values = value if isinstance(value, list) else [value]
    problem = None
    if isinstance(value, list) and action.nargs not in ("+", "*"):
        problem = f"takes one value, got a list {value!r}"
    for v in values:
        if problem:
            break
        if isinstance(v, (dict, list)):
            problem = f"got {type(v).__name__} {v!r}"
            continue
        try:
            converted = action.type(str(v)) if action.type is not None else v
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            problem = f"{v!r} is not a valid value ({e})"
            continue
        if action.choices is not None and converted not in action.choices and str(v) not in map(str, action.choices):
            problem = f"{v!r} is not one of {', '.join(map(str, action.choices))}"
    if problem:
        raise UserError(f"--config {path}: key '{action.dest}': {problem}")


def _flag_text(value) -> str:
    """A Python value as it would be written on the command line."""
    import enum
    import json

    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _accept_none(parser, dataclass_types: Iterable[type]) -> None:
    """A number flag whose field may be None (``--max_grad_norm``, ``--cliprange_value``, ...) also takes ``None``
    (any case) or ``null`` on the command line: argparse would reject it as not a number."""
    import typing

    optional = set()
    for dtype in dataclass_types:
        for name, hint in typing.get_type_hints(dtype).items():
            if type(None) in typing.get_args(hint):
                optional.add(name)
    for action in parser._actions:
        if action.dest in optional and action.type in (int, float):
            number = action.type

            def parse(value, number=number):
                return None if str(value).lower() in ("none", "null") else number(value)

            parse.__name__ = number.__name__  # argparse names the type in its error message
            action.type = parse


def _json_object(value: str) -> dict:
    import json

    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"name\": true}}', got {value!r}")
    return parsed


def _structured_values(parser, dataclass_types: Iterable[type]) -> None:
    """Flags the Hugging Face parser gives a type no command-line word converts to: a field typed ``dict`` only
    (``--liger_kernel_config``) or a config object (``--parallelism_config``, a dataclass) reads a JSON object (the
    object's fields); a field typed ``str | bool`` (``--include_num_input_tokens_seen``) takes its words as well as
    true/false, where the parser made it a boolean."""
    import typing

    from transformers.hf_argparser import string_to_bool

    str_or_bool = set()
    for dtype in dataclass_types:
        for name, hint in typing.get_type_hints(dtype).items():
            if {str, bool} <= set(typing.get_args(hint)):
                str_or_bool.add(name)
    for action in parser._actions:
        if action.type is dict or typing.get_origin(action.type) is dict:
            action.type = _json_object
        elif isinstance(action.type, type) and dataclasses.is_dataclass(action.type):
            def to_config(value, cls=action.type):
                try:
                    return cls(**_json_object(value))
                except TypeError as e:
                    raise argparse.ArgumentTypeError(f"{cls.__name__}: {e}") from e

            to_config.__name__ = action.type.__name__
            action.type = to_config
        elif action.dest in str_or_bool and action.type is string_to_bool:
            def word_or_bool(value):
                try:
                    return string_to_bool(value)
                except argparse.ArgumentTypeError:
                    return value

            action.type = word_or_bool


# transformers 5 renamed these TrainingArguments fields; the old name still sets the field but warns at every run.
RENAMED_FIELDS = {"gradient_checkpointing": "activation_checkpointing",
                  "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def _renamed_fields(parser) -> dict[str, str]:
    """Where the parser has both a renamed field and its new name, the old flag becomes an alias of the new field
    (its action is dropped), so ``--gradient_checkpointing`` (StackLLaMA's flag) sets ``activation_checkpointing``
    without a FutureWarning. Returns the aliases, for YAML keys and ``--help``."""
    dests = {a.dest for a in parser._actions}
    aliases = {}
    for old, new in RENAMED_FIELDS.items():
        if old not in dests or new not in dests:
            continue
        for action in [a for a in parser._actions if a.dest == old]:
            if action.option_strings[0].startswith("--no_"):  # the complement of a field that defaults to True
                action.dest = new
                continue
            parser._remove_action(action)
            for group in parser._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            for flag in action.option_strings:
                parser._option_string_actions.pop(flag, None)
            aliases[f"--{old}"] = new
    return aliases


def _bare_booleans(parser) -> None:
    """Every boolean flag also works bare (``--bf16`` = ``--bf16 true``), as in StackLLaMA's scripts. The Hugging
    Face parser allows that only for fields typed ``bool``; TRL's configs type several as ``bool | None`` (``bf16``,
    ``gradient_checkpointing``: None = decide by device), which then demanded a value."""
    from transformers.hf_argparser import string_to_bool

    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True


def _pop_config(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--config":
            if i + 1 >= len(args):
                raise UserError("--config needs a file path")
            path = args[i + 1]
            del args[i : i + 2]
            return path
        if a.startswith("--config="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def collect(problems: list[str]) -> None:
    """Raise one ``UserError`` listing every problem found while checking the arguments (if any)."""
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else "invalid arguments:\n  " + "\n  ".join(problems))
