"""What a conversation may carry beyond its text: images per turn, opening messages, and
sampling parameters per turn. Every reader checks them here, so a bad value reads the same
in every shape's error message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from nbllm.dataset.cells import describe, did_you_mean, is_list_like, is_missing, scalar
from nbllm.errors import DatasetError
from nbllm.images import ImageReader
from nbllm.types import Message

__all__ = ["MESSAGE_ROLES", "cell_images", "opening_messages", "turn_images", "turn_params"]

MESSAGE_ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = ("role", "content", "name")
# What nbllm itself sets in a request, or what would give a turn more than one answer.
_NOT_PER_TURN = ("model", "messages", "stream", "n")
_IMAGES_SHAPE = (
    "give one list per turn ([[...], [...]], with [] or None for a turn without), or a flat "
    "list of the first turn's images"
)


def _is_image_value(value: Any) -> bool:
    return isinstance(value, (str, bytes, bytearray, memoryview, os.PathLike))


def cell_images(value: Any, where: str, reader: ImageReader) -> tuple[str, ...]:
    """The images of one turn: none (None, NaN, ``[]``), one image, or a list of them."""
    value = scalar(value)
    if _is_image_value(value):
        return (reader.url(value, where),)
    if is_list_like(value):
        items = list(value)
        if len(items) == 1:
            return (reader.url(items[0], where),)
        return tuple(reader.url(v, f"{where}, image {i}") for i, v in enumerate(items))
    if is_missing(value):
        return ()
    msg = f"{where}: expected an image path, URL or bytes (or a list of them), got " + (
        describe(value)
    )
    raise DatasetError(msg)


def turn_images(
    value: Any, n_turns: int, where: str, reader: ImageReader
) -> tuple[tuple[str, ...], ...]:
    """A record's ``images``: one list per turn, or one image / a flat list for turn 0."""
    if value is None:
        return ()
    if _is_image_value(value):
        return ((reader.url(value, f"{where}, turn 0"),), *((),) * (n_turns - 1))
    if not is_list_like(value):
        msg = f"{where}: expected a list of images, got {describe(value)}; {_IMAGES_SHAPE}"
        raise DatasetError(msg)
    items = list(value)
    nested = [v is None or is_list_like(v) for v in items]
    if items and all(nested):
        if len(items) != n_turns:
            msg = (
                f"{where}: expected {n_turns} entries, one list of images per turn, got "
                f"{len(items)}; {_IMAGES_SHAPE}"
            )
            raise DatasetError(msg)
        return tuple(
            cell_images(v, f"{where}, turn {t}", reader) if v is not None else ()
            for t, v in enumerate(items)
        )
    if any(nested):
        msg = f"{where}: a mix of lists and single images; {_IMAGES_SHAPE}"
        raise DatasetError(msg)
    first = tuple(reader.url(v, f"{where}, turn 0, image {i}") for i, v in enumerate(items))
    return (first, *((),) * (n_turns - 1)) if first else ()


def opening_messages(
    value: Any, system: str | None, where: str
) -> tuple[tuple[Message, ...], str | None]:
    """A record's ``messages`` and its system prompt.

    A leading ``system`` message is the conversation's system prompt (a transcript often
    starts with one); beside a ``system`` key it is an error, as is one anywhere else.
    """
    if value is None:
        return (), system
    if not is_list_like(value):
        msg = (
            f"{where}: expected a list of messages like {{'role': 'user', 'content': '...'}}, "
            f"got {describe(value)}"
        )
        raise DatasetError(msg)
    out: list[Message] = []
    for i, message in enumerate(value):
        at = f"{where}, message {i}"
        if not isinstance(message, Mapping):
            msg = f"{at}: expected a mapping {{'role': ..., 'content': ...}}, got " + (
                describe(message)
            )
            raise DatasetError(msg)
        for key in message:
            if key not in _MESSAGE_KEYS:
                hint = did_you_mean(key, _MESSAGE_KEYS)
                msg = f"{at}: unknown key {key!r}{hint}; a message has 'role', 'content', 'name'"
                raise DatasetError(msg)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            hint = did_you_mean(role, MESSAGE_ROLES)
            msg = f"{at}: expected 'role' to be one of {MESSAGE_ROLES}, got {describe(role)}{hint}"
            raise DatasetError(msg)
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            msg = f"{at}: expected 'content' to be a non-empty string, got {describe(content)}"
            raise DatasetError(msg)
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            msg = f"{at}: expected 'name' to be a string, got {describe(name)}"
            raise DatasetError(msg)
        if role == "system":
            if i > 0:
                msg = (
                    f"{at}: a system message may only come first (it is the conversation's "
                    "system prompt)"
                )
                raise DatasetError(msg)
            if system is not None:
                msg = f"{at}: a system message beside the record's system prompt; give one of them"
                raise DatasetError(msg)
            system = content
            continue
        out.append(dict(message))
    return tuple(out), system


def turn_params(value: Any, n_turns: int, where: str) -> tuple[dict[str, Any], ...]:
    """A record's ``turn_params``: one dict (or None) of sampling parameters per turn."""
    if value is None:
        return ()
    if not is_list_like(value):
        msg = (
            f"{where}: expected a list with one dict of parameters per turn (None for a turn "
            f"that has none), got {describe(value)}"
        )
        raise DatasetError(msg)
    items = list(value)
    if len(items) != n_turns:
        msg = f"{where}: expected {n_turns} entries, one per turn, got {len(items)}"
        raise DatasetError(msg)
    out: list[dict[str, Any]] = []
    for t, params in enumerate(items):
        at = f"{where}, turn {t}"
        if params is None:
            out.append({})
            continue
        if not isinstance(params, Mapping):
            msg = f"{at}: expected a dict of sampling parameters or None, got {describe(params)}"
            raise DatasetError(msg)
        for key, param in params.items():
            _check_param(key, param, at)
        out.append(dict(params))
    return tuple(out)


def _check_param(key: Any, value: Any, where: str) -> None:
    if not isinstance(key, str):
        msg = f"{where}: expected parameter names as strings, got {describe(key)}"
        raise DatasetError(msg)
    if key in _NOT_PER_TURN:
        msg = f"{where}: {key!r} cannot vary by turn (nbllm sets it for the whole run)"
        raise DatasetError(msg)
    if key in ("max_tokens", "max_completion_tokens"):
        if type(value) is not int or value < 1:
            msg = f"{where}: {key!r} expected a whole number >= 1, got {describe(value)}"
            raise DatasetError(msg)
    elif key == "temperature":
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not 0 <= value <= 2:
            msg = f"{where}: 'temperature' expected a number between 0 and 2, got " + (
                describe(value)
            )
            raise DatasetError(msg)
    elif key == "response_format" and not isinstance(value, (Mapping, type)):
        msg = (
            f"{where}: 'response_format' expected a dict (JSON schema) or a pydantic model "
            f"class, got {describe(value)}"
        )
        raise DatasetError(msg)
