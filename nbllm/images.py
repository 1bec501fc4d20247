"""Images in a turn: what a dataset may give, and how it is sent.

An image is given as a local path (``str`` or ``os.PathLike``), an ``http(s)://`` URL, a
``data:image/...;base64,...`` URL, or the image's bytes. ``image_url`` turns each into the
URL an OpenAI-compatible API takes in a content part::

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}

A file or bytes become a base64 data URL whose MIME type comes from the first bytes
(PNG, JPEG, GIF, WebP, BMP, TIFF), or, for another format, from the file's name when that
names an image type (``.svg``, ``.avif``, ...). Anything else is refused with a one-line
``DatasetError``. An ``http(s)`` URL is passed on as it is: nothing is fetched.

Because a file is sent as its bytes, the request (and every hash of it: the response cache's
key, the checkpoint's fingerprint) changes when the picture changes, never when it only
moves. ``ImageReader`` reads each file once per dataset, so a picture that many
conversations share is held in memory once.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nbllm.errors import ConfigError, DatasetError

__all__ = [
    "IMAGE_ENGINES",
    "IMAGE_TOKENS",
    "ImageReader",
    "check_engine_takes_images",
    "content_chars",
    "content_text",
    "detect_mime",
    "has_images",
    "prompt_tokens",
]

# The magic numbers of the formats vision models take, and two more that are unambiguous.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
_KNOWN = frozenset({mime for _, mime in _MAGIC} | {"image/webp"})
_DATA_URL = re.compile(r"data:image/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")

IMAGE_ENGINES = ("openai", "litellm", "fake")
"""Engines that send a content part as it is: the OpenAI-compatible client, litellm, and the
fake engine (its handler sees the request). Local engines build a prompt from text with the
model's chat template, so they cannot take an image."""

# Local engines (and a worker serving one) build a text prompt with the chat template.
_TEXT_ONLY = frozenset({"vllm", "deepspeed", "onnx", "torch", "llamacpp", "local", "local-model"})

IMAGE_TOKENS = 1000
"""What an image counts for in a pre-call token estimate: a data URL's length says nothing
of what a provider bills (OpenAI bills a 512x512 tile 170 tokens, a large picture ~1100)."""


def detect_mime(data: bytes, name: str | None = None) -> str | None:
    """The image MIME type of ``data``: by its first bytes, else by ``name`` when that names
    an image type other than one with a magic number here; None when it is no image."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if name is not None and data:
        guessed, _ = mimetypes.guess_type(name)
        # A .png whose bytes are not a PNG is not one; the name decides only the others.
        if guessed is not None and guessed.startswith("image/") and guessed not in _KNOWN:
            return guessed
    return None


class ImageReader:
    """Turns the images a dataset gives into URLs, reading each file once.

    One reader serves one dataset: a path that many conversations name is read once, and
    its data URL is one string they all share.
    """

    __slots__ = ("_urls",)

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}

    def url(self, value: Any, where: str) -> str:
        """The URL of one image (see the module docstring); ``where`` begins each error."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _data_url(bytes(value), None, f"{where}: the bytes given are")
        if isinstance(value, os.PathLike):
            return self._file(Path(os.fsdecode(value)), where)
        if not isinstance(value, str):
            msg = (
                f"{where}: expected an image as a path, an http(s) URL or bytes, got "
                f"{type(value).__name__}"
            )
            raise DatasetError(msg)
        text = value.strip()
        if not text:
            msg = f"{where}: expected an image path or URL, got an empty string"
            raise DatasetError(msg)
        lower = text[:8].lower()
        if lower.startswith(("http://", "https://")):
            return text
        if lower.startswith("data:"):
            return _checked_data_url(text, where)
        scheme = _SCHEME.match(text)
        if scheme is not None:
            if scheme.group(1).lower() == "file":
                return self._file(Path(text[len("file://") :]), where)
            msg = (
                f"{where}: {_short(text)} has a URL scheme nbllm does not read "
                f"({scheme.group(1)}://); give a local path, an http(s) URL or the bytes"
            )
            raise DatasetError(msg)
        return self._file(Path(text).expanduser(), where)

    def _file(self, path: Path, where: str) -> str:
        key = os.path.abspath(path)
        url = self._urls.get(key)
        if url is not None:
            return url
        if not path.exists():
            relative = "" if path.is_absolute() else f" (relative to {os.getcwd()!r})"
            msg = f"{where}: no such image file {str(path)!r}{relative}"
            raise DatasetError(msg)
        if path.is_dir():
            msg = f"{where}: {str(path)!r} is a directory, expected an image file"
            raise DatasetError(msg)
        try:
            data = path.read_bytes()
        except OSError as exc:
            msg = f"{where}: cannot read image file {str(path)!r}: {exc.strerror or exc}"
            raise DatasetError(msg) from exc
        url = _data_url(data, path.name, f"{where}: {str(path)!r} is")
        self._urls[key] = url
        return url


def _data_url(data: bytes, name: str | None, what: str) -> str:
    mime = detect_mime(data, name)
    if mime is None:
        if not data:
            msg = f"{what} empty, not an image"
        else:
            msg = (
                f"{what} not an image (expected PNG, JPEG, GIF, WebP, BMP or TIFF bytes, "
                "or a file named as another image type)"
            )
        raise DatasetError(msg)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _checked_data_url(text: str, where: str) -> str:
    head = _DATA_URL.match(text)
    if head is None:
        msg = f"{where}: {_short(text)} is not a base64 image data URL (data:image/...;base64,...)"
        raise DatasetError(msg)
    payload = text[head.end() :]
    try:
        # The first block is enough to tell base64 from prose without decoding it all.
        base64.b64decode(payload[:64], validate=True)
    except (binascii.Error, ValueError):
        payload = ""
    if not payload:
        msg = f"{where}: the data URL {_short(text)} holds no base64 image"
        raise DatasetError(msg)
    return text


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def content_text(content: Any) -> str:
    """The text of a message's content: the string itself, or its text parts joined by a
    newline (image parts left out)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return "" if content is None else str(content)


def content_chars(content: Any) -> int:
    """A message content's length for a ~4-characters-a-token estimate: its text, plus
    ``IMAGE_TOKENS`` worth for each image rather than its URL's length."""
    if isinstance(content, str):
        return len(content)
    images = 0
    if isinstance(content, Sequence):
        images = sum(
            1 for part in content if isinstance(part, Mapping) and part.get("type") == "image_url"
        )
    return len(content_text(content)) + 4 * IMAGE_TOKENS * images


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """A pre-call estimate of the tokens of ``messages``: about 4 characters a token, an
    image as ``IMAGE_TOKENS``, a few characters for each message's framing."""
    return sum(content_chars(m.get("content", "")) + 8 for m in messages) // 4


def has_images(conversations: Iterable[Any]) -> bool:
    """Whether any turn of ``conversations`` carries an image."""
    return any(any(turn for turn in getattr(c, "images", ())) for c in conversations)


def check_engine_takes_images(engine: Any, conversations: Iterable[Any]) -> None:
    """Refuse, before any request, images for an engine that cannot send them.

    ``engine``: an engine instance (its ``takes_images`` attribute when it has one, else
    its ``name``) or an engine name. ``"auto"`` passes here: check the engine it picks. An
    engine of the user's own (a name nbllm does not know) is trusted to read what it gets.
    """
    if not has_images(conversations):
        return
    declared = getattr(engine, "takes_images", None)
    name = engine if isinstance(engine, str) else str(getattr(engine, "name", engine))
    if isinstance(declared, bool):
        takes = declared
    else:
        takes = name.split(" ")[0] not in _TEXT_ONLY and not name.endswith(" worker")
    if not takes and name == "local":
        msg = (
            "a local model cannot take images (a local engine builds a text prompt); this "
            "dataset has images in its turns: use an API engine with a vision model, or drop "
            "the images"
        )
        raise ConfigError(msg)
    if not takes:
        msg = (
            f"engine {name!r} cannot send images (it builds a text prompt); this dataset has "
            f"images in its turns: use an API engine ({', '.join(IMAGE_ENGINES[:2])}) with a "
            "vision model, or drop the images"
        )
        raise ConfigError(msg)
