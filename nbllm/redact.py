"""Keeping secrets out of what nbllm shows or stores: error text, parameters, URLs.

nbllm never writes a key into results, summaries, events, logs, reprs or files. A server's
error message may echo the key it received, and sampling parameters may carry credentials
(``extra_headers``, ``extra_body={"api_key": ...}``), so every such text goes through one
function before it leaves the engine or reaches a row:

- ``redact(text, secrets)``: the text with every known secret value (the engine's key, every
  ``extra_headers`` value, the provider keys found in the environment) and everything shaped
  like a credential (``Bearer …``, ``sk-…``, ``x-api-key: …``, ``"password": "…"``, ``?key=…``,
  the password in ``scheme://user:password@host``) replaced by ``***``;
- ``hidden(params)``: parameters fit to store or show, every value under a name that looks like
  a credential replaced by ``<hidden>``, at any depth;
- ``public_url(url)``: a URL without its user name and password.

A name looks like a credential when one of its words, split on ``-``, ``_``, ``.``, spaces and
camelCase, is one of ``SECRET_WORDS`` (``X-Api-Key``, ``auth_token``, ``aws_secret_access_key``,
``extra_headers``).
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "HIDDEN",
    "SECRET_WORDS",
    "environment_secrets",
    "hidden",
    "is_secret_name",
    "public_url",
    "redact",
    "redact_error",
    "redact_logs",
    "secret_values",
]

HIDDEN = "<hidden>"
MASK = "***"

SECRET_WORDS = frozenset(
    {"key", "apikey", "secret", "token", "password", "passwd", "auth", "authorization",
     "header", "headers", "cookie", "cookies", "credential", "credentials", "signature",
     "bearer"}
)  # fmt: skip

#: A secret given by value is masked wherever it appears when it is at least this long;
#: shorter values would mask ordinary words.
MIN_SECRET_CHARS = 6
#: An environment variable's value is taken for a key at this length or more.
MIN_ENV_SECRET_CHARS = 8

_USERINFO = re.compile(r"(^|//)[^/\s@]*@")
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_ENV_NAME = re.compile(
    r"(?i)(api_?key|_key$|^key$|token|secret|password|passwd|credential|_auth$|_pat$)"
)
_QUERY_NAMES = "key|api_key|apikey|token|access_token|sig|signature|code"
_VALUE = r"[A-Za-z0-9._~+/=:-]{4,}"


def _masked_value(match: re.Match[str]) -> str:
    """``name: value`` with the value masked, unless the value is a plain word (letters
    only, shorter than any key): ``api_key= expected a string`` is a message, not a key."""
    value = match.group(2)
    if value.isalpha() and len(value) < 16:
        return match.group(0)
    return match.group(1) + MASK


_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # "Authorization: Bearer abc", "Basic dXNlcjpwYXNz"
    (re.compile(rf"(?i)\b(Bearer)(\s+){_VALUE}"), rf"\1\2{MASK}"),
    (re.compile(r"(?i)\b(Basic)(\s+)[A-Za-z0-9+/]{8,}={0,2}"), rf"\1\2{MASK}"),
    # OpenAI-style keys wherever they stand: sk-..., sk-proj-..., sk-ant-...
    (re.compile(r"\bsk-[A-Za-z0-9_-]{4,}"), f"sk-{MASK}"),
    # name: value, name=value, "name": "value" for a credential-like name
    (
        re.compile(
            r"(?i)\b([\w-]*(?:api[_-]?key|[_-]key|access[_-]?token|auth[_-]?token|token|secret"
            r"|password|passwd|authorization|signature|cookie|credentials?)[\"']?\s*[:=]\s*"
            r"[\"']?)([^\s\"',;&}\]]{4,})"
        ),
        _masked_value,
    ),
    # ?key=..., &access_token=... in a URL's query
    (re.compile(rf"(?i)([?&](?:{_QUERY_NAMES})=)[^&\s\"'#]+"), rf"\1{MASK}"),
    # scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@"), rf"\1{MASK}@"),
)


def is_secret_name(name: str) -> bool:
    """True when ``name`` (a parameter or header name) looks like it holds a credential."""
    words = _WORD.findall(str(name))
    return any(word.lower() in SECRET_WORDS for word in words)


def environment_secrets() -> list[str]:
    """Values of environment variables named like credentials (``OPENAI_API_KEY``,
    ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``NBLLM_API_KEY``, ...) long enough to be keys."""
    return [
        value
        for name, value in os.environ.items()
        if len(value) >= MIN_ENV_SECRET_CHARS and _ENV_NAME.search(name)
    ]


def secret_values(params: Mapping[str, Any]) -> list[str]:
    """Every string under a credential-like name in ``params``, at any depth: the values
    ``redact`` must mask in text (``extra_headers``' values, ``extra_body["api_key"]``)."""
    found: list[str] = []

    def leaves(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                leaves(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                leaves(item)

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for name, item in value.items():
                if is_secret_name(name):
                    leaves(item)
                else:
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(params)
    return found


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret in it replaced by ``***``: the values in ``secrets``, the
    environment's keys, and anything shaped like a credential (see the module's docstring)."""
    values = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_CHARS}
    values.update(environment_secrets())
    for value in sorted(values, key=len, reverse=True):  # a key before its own prefix
        if value in text:
            text = text.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_error(error: BaseException, secrets: Iterable[str | None] = ()) -> None:
    """Mask the secrets in ``error``'s message, in place (see ``redact``). The exceptions it
    was raised from are cut off when their text holds a secret, so that no traceback of
    it shows one."""
    error.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in error.args)
    for linked in (error.__cause__, error.__context__):
        if linked is not None and redact(str(linked), secrets) != str(linked):
            error.__cause__ = None
            error.__context__ = None
            error.__suppress_context__ = True
            return


def hidden(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` fit to store or show: the value under every credential-like name, at any
    depth, replaced by ``<hidden>``, and credential-shaped text in other strings masked."""

    def shown(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: HIDDEN if is_secret_name(k) else shown(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [shown(item) for item in value]
        if isinstance(value, str):
            for pattern, replacement in _PATTERNS:
                value = pattern.sub(replacement, value)
        return value

    result: dict[str, Any] = shown(params)
    return result


def public_url(url: str) -> str:
    """``url`` without any user name or password in it, safe to log and store. Text that is
    not a URL at all still loses anything shaped like ``user:password@``."""
    try:
        parts = urllib.parse.urlsplit(url)
        username, password, hostname, port = (
            parts.username,
            parts.password,
            parts.hostname,
            parts.port,
        )
    except ValueError:  # a port that is not a number, brackets that do not close
        return _USERINFO.sub(r"\1", url)
    if not parts.netloc:  # not a URL ("user:pass@host"): drop what may be a user and password
        return _USERINFO.sub(r"\1", url)
    if username is None and password is None:
        return url
    netloc = hostname or ""
    if ":" in netloc:  # an IPv6 address
        netloc = f"[{netloc}]"
    if port:
        netloc += f":{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class _RedactingFilter(logging.Filter):
    """Masks credentials in every record of the logger it is on (``redact``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit: left to logging to report
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


_FILTER = _RedactingFilter()


def redact_logs(*names: str) -> None:
    """Mask credentials in what the loggers ``names`` record, from now on. For other
    libraries' loggers that nbllm drives (the OpenAI client logs each request's headers
    and body at DEBUG). Idempotent; it costs nothing while their level is off."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
