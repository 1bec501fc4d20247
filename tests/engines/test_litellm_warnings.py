"""litellm stays quiet whatever warnings context it was first imported in.

litellm ignores a pydantic warning about its own types with a filter set at import, but the
warning comes later, when a response type is first built. An import inside an earlier
``catch_warnings()`` (an earlier pytest test, say) loses that filter; the run after it must
still pass where warnings are errors. A fresh interpreter, so that no earlier test has
already built litellm's types here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import warnings

    warnings.simplefilter("error")

    import nbllm
    from nbllm.engines.litellm import import_litellm
    from nbllm.testing import TestServer

    with warnings.catch_warnings():
        import_litellm()  # as an earlier test would: its filters end with this block

    with TestServer() as server:
        result = nbllm.run(
            [{"id": "a", "turns": ["hi", "and again?"]}],
            model="openai/nbllm-test", engine="litellm", api_base=server.url,
            retries=0, checkpoint=False, cache=False, progress=False,
        )
    print(result.df["error"].isna().tolist())
    """
)


def test_a_run_after_an_import_in_another_warnings_context_has_no_warning_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[True, True]", out.stdout + out.stderr[-2000:]
