"""Byte-level BPE vocabularies from GGUF metadata, rebuilt as a `tokenizers.Tokenizer`.

Owns: reading `tokenizer.ggml.*` (tokens, merges, token types, special token ids, add_bos/eos)
and choosing the pre-tokenizer that `tokenizer.ggml.pre` names, the way llama.cpp splits text
for that family (and the family's Hugging Face tokenizer.json does). For "smollm" that is every
numeric character on its own, then GPT-2's byte-level regex. Must not import torch nor
anything from kvrelay above `errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from kvrelay.errors import CorruptModelError

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split patterns, as the Hugging Face tokenizer.json files of these families write them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` family splits text before BPE."""

    split: str | None = None  # None: GPT-2's built-in ByteLevel regex
    individual_digits: bool = False  # every \p{N} char is its own piece (SmolLM, StarCoder)
    ignore_merges: bool = False  # a piece that is a whole vocab entry is not merged (Llama 3)
    nfc: bool = False


_GPT2 = _PreTokenizerSpec()
_DIGITS = _PreTokenizerSpec(individual_digits=True)
_LLAMA3 = _PreTokenizerSpec(split=_LLAMA3_SPLIT, ignore_merges=True)
_QWEN2 = _PreTokenizerSpec(split=_QWEN2_SPLIT, nfc=True)
_PRE_TOKENIZERS: dict[str, _PreTokenizerSpec] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"), _GPT2),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), _DIGITS
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@dataclass(frozen=True)
class GGUFVocab:
    """A ready `tokenizers.Tokenizer` and the named special tokens of a GGUF file."""

    backend: BackendTokenizer
    bos: str | None
    eos: str | None
    unk: str | None
    pad: str | None
    extra_eos_ids: tuple[int, ...]  # end-of-turn tokens that also stop generation (Llama 3)


def build_gguf_vocab(fields: Mapping[str, Any]) -> GGUFVocab:
    """Build from GGUF metadata values keyed by their GGUF names. Raises CorruptModelError for
    a tokenizer model other than byte-level BPE ("gpt2") or a malformed vocabulary."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CorruptModelError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use a GGUF with a BPE vocabulary or a Hugging Face model directory"
        )
    tokens = [str(t) for t in fields.get("tokenizer.ggml.tokens") or ()]
    merges = [str(m) for m in fields.get("tokenizer.ggml.merges") or ()]
    if not tokens or not merges:
        raise CorruptModelError("GGUF BPE tokenizer has no tokens or no merges")
    try:
        types = [int(t) for t in fields.get("tokenizer.ggml.token_type") or ()]
        types += [1] * (len(tokens) - len(types))  # 1: a normal token
        named = {k: _token_at(fields, tokens, k) for k in ("bos", "eos", "unknown", "padding")}
        backend = _byte_level_backend(tokens, types, merges, _pre_tokenizer_spec(fields))
        # BOS / EOS are special even if mislabelled; pad / unk can be ordinary text (e.g. "!").
        _add_special_tokens(backend, tokens, types, {t for t in (named["bos"], named["eos"]) if t})
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
        _set_bos_eos(backend, named["bos"] if add_bos else None, named["eos"] if add_eos else None)
    except CorruptModelError:
        raise
    except Exception as exc:  # tokenizers reports a bad vocabulary as a bare Exception
        raise CorruptModelError(f"GGUF tokenizer cannot be built: {exc}") from exc
    extra_eos = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return GGUFVocab(
        backend,
        bos=named["bos"],
        eos=named["eos"],
        unk=named["unknown"],
        pad=named["padding"],
        extra_eos_ids=tuple(int(i) for i in extra_eos if i is not None),
    )


def _token_at(fields: Mapping[str, Any], tokens: list[str], key: str) -> str | None:
    index = fields.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def _pre_tokenizer_spec(fields: Mapping[str, Any]) -> _PreTokenizerSpec:
    name = fields.get("tokenizer.ggml.pre")
    spec = _PRE_TOKENIZERS.get(str(name)) if name is not None else _GPT2
    if spec is None:
        logger.warning(
            "GGUF pre-tokenizer %r is not known to kvrelay; splitting text like GPT-2, "
            "so token ids may differ from the original tokenizer",
            name,
        )
        return _GPT2
    return spec


def _byte_level_backend(
    tokens: list[str], types: list[int], merges: list[str], spec: _PreTokenizerSpec
) -> BackendTokenizer:
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    added = {_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED}
    vocab: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(tokens, types, strict=False)):
        # Added tokens keep their text (they are matched whole, by text, before BPE). A normal
        # token written in plain text by some converter needs the byte spelling BPE uses.
        plain = kind in added or set(token) <= spelled
        key = token if plain else "".join(alphabet[b] for b in token.encode())
        vocab.setdefault(key, index)
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise CorruptModelError(f"GGUF tokenizer merge {merge!r} is malformed")
        pairs.append((left, right))
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=spec.ignore_merges)
    backend = BackendTokenizer(bpe)
    if spec.nfc:
        backend.normalizer = normalizers.NFC()
    steps: list[Any] = []
    if spec.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if spec.split is not None:
        steps.append(pre_tokenizers.Split(Regex(spec.split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.split is None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_special_tokens(
    backend: BackendTokenizer, tokens: list[str], types: list[int], named: set[str]
) -> None:
    """Control tokens (and `named`) become special added tokens, matched whole in text and
    skipped when decoding; user-defined tokens become plain added tokens."""
    control = [t for t, k in zip(tokens, types, strict=False) if k == _TOKEN_TYPE_CONTROL]
    ordered = list(dict.fromkeys([*control, *sorted(named)]))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ordered])
    user = [t for t, k in zip(tokens, types, strict=False) if k == _TOKEN_TYPE_USER_DEFINED]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _set_bos_eos(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """Have `encode(add_special_tokens=True)` add BOS / EOS (when the file asks for them)."""
    if bos is None and eos is None:
        return
    marks = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    single = [*([bos] if bos else []), "$A", *([eos] if eos else [])]
    pair = [*single, *[f"{t}:1" if t != "$A" else "$B:1" for t in single]]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=marks
    )
