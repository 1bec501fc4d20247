"""Which key goes to a server named by ``api_base``: environment keys stay with their provider.

A provider key in the environment (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ...) is meant for
that provider's own host. Left to itself, litellm reads the variable of the model's provider
and sends it to whatever ``api_base`` says: ``OPENAI_API_KEY`` to a local server for
``gpt-4o-mini``, ``HOSTED_VLLM_API_KEY`` for ``hosted_vllm/...``. The rule, for every engine and
every model prefix, when no key is given explicitly:

- no ``api_base``: the provider's own host; litellm reads its usual variable (``None`` here);
- an ``https`` ``api_base`` on a provider's own host (``PROVIDER_HOSTS``): that provider's
  variable, e.g. ``OPENAI_API_KEY`` for ``https://api.openai.com/v1``;
- any other ``api_base``: ``NBLLM_API_KEY``, or no key at all (litellm, which insists on one,
  then sends ``PLACEHOLDER_KEY``).
"""

from __future__ import annotations

import os
import re
import urllib.parse

from nbllm.errors import ConfigError
from nbllm.redact import public_url

__all__ = [
    "NBLLM_KEY_ENV",
    "PLACEHOLDER_KEY",
    "PROVIDER_HOSTS",
    "checked_key_for_api_base",
    "key_for_api_base",
    "provider_key_names",
]

#: The variable holding the key for a server of one's own (any ``api_base`` not a provider's).
NBLLM_KEY_ENV = "NBLLM_API_KEY"
#: What litellm sends where there is no key: it refuses to send nothing, and this says plainly
#: that it is none (the convention of vLLM's OpenAI-compatible server).
PLACEHOLDER_KEY = "EMPTY"

#: A provider's own API host -> the variables holding its key, first found wins. A name that
#: starts with "." matches that domain's subdomains (an Azure resource's own host).
PROVIDER_HOSTS: dict[str, tuple[str, ...]] = {
    "api.openai.com": ("OPENAI_API_KEY",),
    "api.anthropic.com": ("ANTHROPIC_API_KEY",),
    "generativelanguage.googleapis.com": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    ".openai.azure.com": ("AZURE_API_KEY", "AZURE_OPENAI_API_KEY"),
    ".cognitiveservices.azure.com": ("AZURE_API_KEY", "AZURE_OPENAI_API_KEY"),
    "api.mistral.ai": ("MISTRAL_API_KEY",),
    "api.groq.com": ("GROQ_API_KEY",),
    "api.together.xyz": ("TOGETHERAI_API_KEY", "TOGETHER_API_KEY", "TOGETHER_AI_API_KEY"),
    "openrouter.ai": ("OPENROUTER_API_KEY", "OR_API_KEY"),
    "api.deepseek.com": ("DEEPSEEK_API_KEY",),
    "api.fireworks.ai": ("FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY", "FIREWORKSAI_API_KEY"),
    "api.x.ai": ("XAI_API_KEY",),
    "api.cohere.com": ("COHERE_API_KEY", "CO_API_KEY"),
    "api.cohere.ai": ("COHERE_API_KEY", "CO_API_KEY"),
    "api.perplexity.ai": ("PERPLEXITYAI_API_KEY", "PERPLEXITY_API_KEY"),
    "api.cerebras.ai": ("CEREBRAS_API_KEY",),
    "api.deepinfra.com": ("DEEPINFRA_API_KEY",),
}

# The authority a provider host must be written as: no user info, nothing another URL parser
# could read as a different host ("https://evil.example\@api.openai.com" is evil.example to a
# browser's parser but api.openai.com to urllib's).
_PLAIN_AUTHORITY = re.compile(r"[a-z0-9.-]+(:[0-9]{1,5})?")


def provider_key_names(api_base: str) -> tuple[str, ...]:
    """The variables holding the key for ``api_base`` when it is a provider's own host over
    https (see ``PROVIDER_HOSTS``); ``()`` for any other server, or a URL that is unclear."""
    try:
        parts = urllib.parse.urlsplit(api_base.strip())
    except ValueError:
        return ()
    authority = parts.netloc.lower()
    if parts.scheme.lower() != "https" or not _PLAIN_AUTHORITY.fullmatch(authority):
        return ()
    host = authority.partition(":")[0]
    for name, variables in PROVIDER_HOSTS.items():
        if host == name or (name.startswith(".") and host.endswith(name)):
            return variables
    return ()


def key_for_api_base(api_base: str | None, api_key: str | None) -> str | None:
    """The key to send to ``api_base``: ``api_key`` when given; otherwise ``None`` without an
    ``api_base`` (the provider's own host: litellm reads its usual variable), the provider's
    variable for a provider's own host, and ``NBLLM_API_KEY`` for any other server (``None``
    when unset). A provider key from the environment never goes anywhere else."""
    if api_key is not None:
        return api_key
    if api_base is None:
        return None
    names = provider_key_names(api_base) or (NBLLM_KEY_ENV,)
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def checked_key_for_api_base(api_base: str | None, api_key: str | None) -> str | None:
    """``key_for_api_base``, refusing (``ConfigError``) a provider's own host whose key is in
    neither place, as ``check_credentials`` refuses a provider's model: each request would
    only be refused (401)."""
    key = key_for_api_base(api_base, api_key)
    wanted = provider_key_names(api_base) if api_base and key is None else ()
    if wanted:
        msg = (
            f"api_base={public_url(api_base or '')!r} needs {' or '.join(wanted)} in the "
            "environment (or pass api_key=)"
        )
        raise ConfigError(msg)
    return key
