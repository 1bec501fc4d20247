"""The command's flags and the magic's options, made from the one option schema
(``nbllm.config.RunConfig``): an option added there is a flag here with no more code."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nbllm.config import RunConfig, option_about, option_reader, takes_many, text_type

__all__ = ["add_run_arguments"]


class _OneOrMore(argparse.Action):
    """A flag that may be given again: its value, or the list of every value given."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        before = getattr(namespace, self.dest, None)
        if before is None:
            setattr(namespace, self.dest, values)
        else:
            setattr(
                namespace, self.dest, [*(before if isinstance(before, list) else [before]), values]
            )


def add_run_arguments(
    parser: argparse._ActionsContainer,
    names: Iterable[str],
    *,
    short: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """One ``--flag-name`` per option in ``names``: type, help and metavar from the schema
    (``--flag-name`` / ``--no-flag-name`` for a True/False option).

    Every flag defaults to None, meaning "not given": ``nbllm.run``'s own default applies.
    ``short`` adds a one-letter alias (``{"model": "-m"}``); ``choices`` lists allowed values.
    """
    for name in names:
        field = RunConfig.model_fields[name]
        default = field.default
        help_text = field.description or ""
        if default is not None:
            help_text += f" (default: {default})"
        flags = [short[name]] if short and name in short else []
        kwargs: dict[str, Any] = {"default": None, "help": help_text}
        if field.annotation is bool:  # --name / --no-name
            kwargs["action"] = argparse.BooleanOptionalAction
            parser.add_argument(*flags, "--" + name.replace("_", "-"), **kwargs)
            continue
        if text_type(name) is not str:
            kwargs["type"] = option_reader(name)
        if takes_many(name):
            kwargs["action"] = _OneOrMore  # given again: one more
        if choices and name in choices:
            kwargs["choices"] = choices[name]
        else:
            kwargs["metavar"] = option_about(name, "metavar")
        parser.add_argument(*flags, "--" + name.replace("_", "-"), **kwargs)
