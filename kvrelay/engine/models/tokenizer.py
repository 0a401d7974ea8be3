"""Text <-> token ids for one model: encoding, decoding, streaming detokenization, chat templates.

Owns: `Tokenizer` (a `tokenizers.Tokenizer` plus the model's special tokens and chat template),
built from a Hugging Face directory (`tokenizer.json`) or from GGUF metadata (via
`gguf_vocab`), and `IncrementalDecoder` for streaming.
Must not import torch (the frontend tokenizes in processes that never load a model) nor
anything from kvrelay above `errors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from kvrelay.engine.models.chat_template import (
    ChatTemplate,
    compile_chat_template,
    find_hf_chat_template,
    render_chat_template,
)
from kvrelay.engine.models.gguf_vocab import build_gguf_vocab
from kvrelay.errors import CorruptModelError, InvalidRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecialTokens:
    """The named special tokens, as text; what chat templates see as `bos_token` etc."""

    bos: str | None = None
    eos: str | None = None
    unk: str | None = None
    pad: str | None = None

    def as_template_vars(self) -> dict[str, str]:
        named = {"bos_token": self.bos, "eos_token": self.eos}
        named |= {"unk_token": self.unk, "pad_token": self.pad}
        return {k: v for k, v in named.items() if v is not None}


class Tokenizer:
    """One model's tokenizer: a `tokenizers.Tokenizer`, its special tokens and chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        special: SpecialTokens,
        *,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.special = special
        self.chat_template = chat_template
        self.bos_token_id = self.token_to_id(special.bos)
        eos_ids = [i for i in (self.token_to_id(special.eos), *eos_token_ids) if i is not None]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self._template: ChatTemplate | None = None

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer | None:
        """Load `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`); None when
        the directory has no `tokenizer.json`."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        try:
            backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
            config = _read_json(path / "tokenizer_config.json")
            generation = _read_json(path / "generation_config.json")
        except Exception as exc:  # tokenizers raises a bare Exception; json a ValueError
            raise CorruptModelError(f"cannot read the tokenizer in {path}: {exc}") from exc
        special = SpecialTokens(
            **{k: _token_text(config.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad")}
        )
        eos = generation.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            backend,
            special,
            eos_token_ids=eos_ids,
            chat_template=find_hf_chat_template(path, config),
        )

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:
        """Build from a `gguf.GGUFReader`'s `tokenizer.*` metadata."""
        fields = {
            name: field.contents()
            for name, field in reader.fields.items()
            if name.startswith("tokenizer.")
        }
        return cls.from_gguf_fields(fields)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build a byte-level BPE tokenizer from GGUF metadata values keyed by their GGUF
        names (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`, ...)."""
        vocab = build_gguf_vocab(fields)
        special = SpecialTokens(bos=vocab.bos, eos=vocab.eos, unk=vocab.unk, pad=vocab.pad)
        return cls(
            vocab.backend,
            special,
            eos_token_ids=vocab.extra_eos_ids,
            chat_template=fields.get("tokenizer.chat_template"),
        )

    def save(self, path: Path) -> None:
        """Write a Hugging Face style directory that `from_hf_dir` reads back identically."""
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config: dict[str, Any] = {
            f"{k}_token": getattr(self.special, k) for k in ("bos", "eos", "unk", "pad")
        }
        config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids)}
        (path / "generation_config.json").write_text(json.dumps(generation))

    # ---- encode / decode -----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched whole."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        index: int | None = self.backend.token_to_id(token)
        return index

    # ---- chat templates ------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's Jinja chat template (sandboxed, as transformers
        does). Raises InvalidRequestError when there is no template or it rejects the chat."""
        if self._template is None:
            if not self.chat_template:
                raise InvalidRequestError(
                    "this model has no chat template (no `tokenizer.chat_template` in the GGUF, "
                    "no `chat_template` in tokenizer_config.json); send a plain completion instead"
                )
            self._template = compile_chat_template(self.chat_template)
        variables = {**self.special.as_template_vars(), **kwargs}
        return render_chat_template(self._template, messages, add_generation_prompt, variables)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, emitting only complete UTF-8 characters.

    Decodes a small window (tokens since the last emitted piece, plus the piece before) so
    decoders that depend on context (a SentencePiece leading space) see what full decoding
    sees; text is held back while the window ends in an incomplete byte sequence (U+FFFD).
    The concatenation of every `push` plus `flush` equals `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        self._num_seen = 0  # tokens pushed, skipped ones included
        self._prefix_offset = 0
        self._read_offset = 0
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (often "", never a partial char)."""
        self._num_seen += 1
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        return self._emit(final=False)

    def extend(self, token_ids: Sequence[int]) -> str:
        """Add several tokens; return the newly completed text."""
        return "".join([self.push(t) for t in token_ids])

    def update(self, all_token_ids: Sequence[int]) -> str:
        """Given every token generated so far, add the ones not seen yet; return the new text."""
        return self.extend(all_token_ids[self._num_seen :])

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character becomes U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        decode = self._tokenizer.backend.decode
        window = self._ids[self._prefix_offset :]
        prefix = decode(
            window[: self._read_offset - self._prefix_offset], skip_special_tokens=False
        )
        full = decode(window, skip_special_tokens=False)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        piece = str(full[len(prefix) :])
        self._pieces.append(piece)
        return piece


# ---- Hugging Face directory helpers ---------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
