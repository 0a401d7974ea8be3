"""Prompt token ids for offline analysis: what a server would tokenize for each request.

Owns: the `TextTokenizer` protocol, `ApproxTokenizer` (an offline stand-in needing no model),
`load_tokenizer(spec)` (the default model's or any model's tokenizer, read without loading the
weights), and `prompt_token_ids(request, tokenizer)`: chat requests are rendered with the chat
template then encoded without added special tokens (the template writes them); completions are
encoded as given; trace requests already carry token ids. Must not import the load client.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from kvrelay.bench.workloads.base import RequestSpec
from kvrelay.errors import InvalidRequestError

APPROX = "approx"
_PIECE_RE = re.compile(r"[A-Za-z]+|\d|\s+|[^A-Za-z\d\s]")
_APPROX_VOCAB = 50_000
_MAX_PIECE = 6  # longer words are split, as BPE splits rare long words


class TextTokenizer(Protocol):
    """The part of `kvrelay.engine.models.tokenizer.Tokenizer` analysis needs."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str: ...


class ApproxTokenizer:
    """A deterministic tokenizer-shaped function for analysis without a model: words (cut to
    six letters), single digits, whitespace runs and punctuation become ids via CRC-32. Counts
    land near a BPE tokenizer's on code; sharing is exact wherever the texts are equal."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for match in _PIECE_RE.finditer(text):
            piece = match.group()
            for start in range(0, len(piece), _MAX_PIECE):
                chunk = piece[start : start + _MAX_PIECE].encode()
                ids.append(zlib.crc32(chunk) % _APPROX_VOCAB)
        return ids

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


def load_tokenizer(spec: str) -> TextTokenizer:
    """`approx`, or a model spec as `kvrelay serve --model` takes it (default-model name,
    `.gguf` file, Hugging Face directory); only the tokenizer is read, never the weights."""
    if spec == APPROX:
        return ApproxTokenizer()
    from kvrelay.engine.models.loader import resolve_model_path
    from kvrelay.engine.models.tokenizer import Tokenizer

    path = resolve_model_path(spec)
    if path.is_dir():
        tokenizer = Tokenizer.from_hf_dir(path)
        if tokenizer is None:
            raise InvalidRequestError(f"{path} has no tokenizer.json; use --tokenizer approx")
        return tokenizer
    import gguf

    return Tokenizer.from_gguf(gguf.GGUFReader(path))


def prompt_token_ids(request: RequestSpec, tokenizer: TextTokenizer | None) -> list[int]:
    """The token ids a server would compute for `request` with `tokenizer`."""
    if request.prompt_token_ids:
        return list(request.prompt_token_ids)
    if tokenizer is None:
        raise InvalidRequestError(
            f"request {request.request_id} is text; analysing it needs a tokenizer"
        )
    if request.kind == "chat":
        text = tokenizer.apply_chat_template([m.as_dict() for m in request.messages])
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(request.prompt)
