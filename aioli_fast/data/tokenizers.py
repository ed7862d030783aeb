"""Tokenizers for ``prepare``: byte-level (default, nothing to download) and local HF ``tokenizer.json``.

A tokenizer is described in the manifest by a small dict (``spec()``) so that the corpus records what
produced its token ids, and ``load_tokenizer(spec)`` rebuilds it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from ..errors import AioliError

# Special tokens tried, in order, as end-of-document marker of an HF tokenizer.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")

_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """``text`` with every lone surrogate (JSON may carry ``"\\ud800"``, which is not text) replaced by
    U+FFFD, which UTF-8 encodes as EF BF BD. (``str.encode(errors="replace")`` would give ``?``.)"""
    return _SURROGATE_RE.sub("\ufffd", text) if _SURROGATE_RE.search(text) else text


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, and id 256 as end of document. Vocabulary 257."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate
            return list(replace_surrogates(text).encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text as uint8 arrays (the UTF-8 bytes, without copying them)."""
        out = []
        for text in texts:
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate
                data = replace_surrogates(text).encode("utf-8")
            out.append(np.frombuffer(data, dtype=np.uint8))
        return out

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (needs the ``tokenizers`` package: ``pip install .[hf]``)."""

    name = "hf"

    def __init__(self, path: str | Path, eos_token: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise AioliError(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise AioliError(
                "an HF tokenizer.json needs the 'tokenizers' package: pip install 'aioli_fast[hf]'"
            ) from exc
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the library raises its own exception types
            raise AioliError(f"cannot load tokenizer {path}: {exc}") from exc
        self.path = path.resolve()
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                self.eos_token, self.eos_id = token, token_id
                break
        else:
            raise AioliError(
                f"tokenizer {path} has no end-of-document token among {list(candidates)}; "
                "name one with --eos-token"
            )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(replace_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (the ``tokenizers`` batch API, which runs on several threads)."""
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        encoded = self._tok.encode_batch([replace_surrogates(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=dtype) for e in encoded]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {
            "kind": "hf",
            "path": str(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
        }


def get_tokenizer(name: str, eos_token: str | None = None):
    """``"byte"`` or the path of a ``tokenizer.json``."""
    if name == "byte":
        if eos_token is not None:
            raise AioliError(
                "--eos-token applies to an HF tokenizer.json; the byte tokenizer's end of document is 256"
            )
        return ByteTokenizer()
    return HFTokenizer(name, eos_token=eos_token)


def load_tokenizer(spec: dict, root: str | Path | None = None):
    """Rebuild the tokenizer a manifest describes (an HF path is relative to the corpus ``root``)."""
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    if spec.get("kind") == "hf":
        path = Path(spec["path"])
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        return HFTokenizer(path, eos_token=spec.get("eos_token"))
    raise AioliError(f"unknown tokenizer kind in manifest: {spec!r}")
