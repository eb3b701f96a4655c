"""Command-line plumbing shared by the four scripts: argument parsing with StackLLaMA aliases and ``--config``
YAML, and the one place where a user mistake becomes a one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable

import yaml


class UserError(Exception):
    """A mistake in the user's flags, files or data. Printed as ``error: <message>``, exit status 2."""


def run(main: Callable[..., None], *args) -> None:
    """Call ``main(*args)``; a ``UserError`` is printed without a traceback and exits with status 2.

    The command line's end: a process group the stage joined (torchrun) is left before the interpreter exits, since
    a gloo group torn down by interpreter shutdown can abort the process after the work is done."""
    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _leave_process_group()
        sys.exit(2)
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
) -> tuple:
    """Parse ``args`` (default ``sys.argv[1:]``) into one instance of each dataclass.

    - ``aliases`` maps an extra flag (``"--model_path"``) to a field name (``"model_name_or_path"``); both
      spellings work on the command line and as YAML keys, and ``--help`` lists them together.
    - ``defaults`` overrides the dataclasses' defaults (the historical StackLLaMA values).
    - ``--config run.yaml`` sets defaults from a YAML mapping; flags on the command line override it. An
      unknown key in the YAML is an error, as an unknown flag is.
    """
    from transformers import HfArgumentParser

    aliases = aliases or {}
    class Parser(HfArgumentParser):
        error = ArgumentParser.error  # raise UserError instead of exiting

    # allow_abbrev=False: a typo is an error, not a prefix
    parser = Parser(list(dataclass_types), description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None,
                        help="YAML file of argument defaults; command-line flags override it.")
    _accept_none(parser, dataclass_types)
    for alias, dest in aliases.items():
        action = next((a for a in parser._actions if a.dest == dest), None)
        assert action is not None, f"alias {alias} targets unknown field {dest}"
        action.option_strings.append(alias)
        parser._option_string_actions[alias] = action
    dests = {a.dest for a in parser._actions}
    alias_dest = {a.lstrip("-"): d for a, d in aliases.items()}
    if defaults:
        unknown = set(defaults) - dests
        assert not unknown, f"defaults for unknown fields {unknown}"
        parser.set_defaults(**defaults)

    args = list(sys.argv[1:] if args is None else args)
    config_path = _pop_config(args)
    if config_path:
        if not os.path.isfile(config_path):
            raise UserError(f"--config {config_path}: no such file")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {config_path} is not valid YAML: {e}") from e
        if not isinstance(config, dict):
            raise UserError(f"--config {config_path} must hold a mapping of argument names to values")
        config = {alias_dest.get(k, k): v for k, v in config.items()}
        unknown = sorted(k for k in config if k not in dests)
        if unknown:
            raise UserError(f"--config {config_path}: unknown key{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)}")
        for action in parser._actions:
            if action.dest in config:
                action.default = config[action.dest]
                action.required = False
    namespace, remaining = parser.parse_known_args(args)
    if remaining:
        raise UserError(f"unrecognized arguments: {' '.join(remaining)} (see --help)")
    outputs = []
    for dtype in parser.dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        values = {k: v for k, v in vars(namespace).items() if k in keys}
        try:
            outputs.append(dtype(**values))
        except (ValueError, TypeError, ImportError) as e:  # a library config's own validation (e.g. TrainingArguments)
            raise UserError(str(e)) from e
    return tuple(outputs)


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
