"""``nbllm serve``: one nbllm ``Engine`` behind an OpenAI-compatible HTTP API.

::

    nbllm serve --engine torch --model models/Qwen2.5-0.5B-Instruct --port 8000
    # prints: nbllm serve listening on http://127.0.0.1:8000/v1

Any OpenAI-compatible client (``OpenAIEngine``, the ``openai`` package, another nbllm on
another machine) can then send chat requests to it. Routes:

- ``POST /v1/chat/completions``: one chat completion (no streaming);
- ``GET /v1/models``: the one served model;
- ``GET /health``: 200 while the process is up, also while the model loads;
- ``GET /ready``: 200 once the engine is loaded, 503 while loading, after a failed load
  and while draining.

The engine is loaded in a thread, so the server answers ``/health`` and ``/ready`` from
the first moment. At most ``max_queue`` chat requests are admitted at once; one more gets
429 with ``Retry-After``, never a silent drop. With an API key every ``/v1/`` request
must carry ``Authorization: Bearer KEY``. SIGTERM or SIGINT drains: new requests get 503,
those admitted are answered (for up to ``grace`` seconds), then the engine is closed.

``--parent-pid PID`` and ``--stop-on-stdin-eof`` (what a ``Worker`` passes) stop the
server when the process that started it has gone, killed or not: those requests' clients
went with it, so they are cut off rather than drained, and the process exits within
``PARENT_GONE_EXIT_S`` seconds whatever its engine does.

``EngineServer`` (``nbllm.serve.server``) is the server, usable from Python;
``nbllm.serve.command`` is the command around it.
"""

from __future__ import annotations

from nbllm.engines.openai_wire import SERVE_API_KEY_ENV, SERVE_URL_LINE_PREFIX
from nbllm.serve.command import PARENT_GONE_EXIT_S, add_parser, main
from nbllm.serve.server import EngineServer, ServeState

__all__ = [
    "API_KEY_ENV",
    "PARENT_GONE_EXIT_S",
    "URL_LINE_PREFIX",
    "EngineServer",
    "ServeState",
    "add_parser",
    "main",
]

#: The one line ``nbllm serve`` prints to stdout starts with this, then the ``/v1`` URL.
URL_LINE_PREFIX = SERVE_URL_LINE_PREFIX
#: The environment variable that holds the server's API key (safer than ``--api-key``).
API_KEY_ENV = SERVE_API_KEY_ENV
