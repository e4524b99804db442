"""Text prompts to token ids, with a tokenizer found on this machine.

Routing needs the token ids the engine will see; the best source is the caller (an
endpoint picker that already applied the chat template and tokenized). For text, the
router loads a local tokenizer: a ``tokenizer.json`` (or a directory holding one)
through the ``tokenizers`` package, else a directory or cached name through
``transformers`` with ``local_files_only``; nothing is downloaded. Neither package is
a dependency of kvtier. Text is encoded as given, with the tokenizer's special
tokens: a tokenizer or template unlike the engine's gives other ids, other keys and
no hits (llm-d's users hit this), so prefer sending token ids.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.errors import RouteError

__all__ = ["Encoder", "load_tokenizer"]

Encoder = Callable[[str], list[int]]


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str) -> Encoder:
    """A function from text to token ids, for the tokenizer ``name``.

    Args:
        name: A ``tokenizer.json``, a directory with one, or a model name or
            directory ``transformers`` can load without the network.

    Raises:
        RouteError: No tokenizer package is installed, or it cannot load ``name``.
    """
    path = Path(name)
    json_file = path / "tokenizer.json" if path.is_dir() else path
    if json_file.suffix == ".json" and json_file.is_file():
        tokenizers = _optional_module("tokenizers")
        if tokenizers is not None:
            return _from_tokenizers(tokenizers, json_file)
    transformers = _optional_module("transformers")
    if transformers is not None:
        return _from_transformers(transformers, name)
    raise RouteError(
        f"cannot tokenize text with {name!r}: install the 'tokenizers' or "
        "'transformers' package (pip install tokenizers), or send token_ids"
    )


def _optional_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _from_tokenizers(tokenizers: Any, path: Path) -> Encoder:
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the package raises its own untyped errors
        raise RouteError(f"cannot load tokenizer {path}: {exc}") from exc

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text).ids)

    return encode


def _from_transformers(transformers: Any, name: str) -> Encoder:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            name, local_files_only=True
        )
    except Exception as exc:  # OSError, ValueError and the package's own errors
        raise RouteError(
            f"cannot load tokenizer {name!r} from local files: {exc}"
        ) from exc

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text))

    return encode
