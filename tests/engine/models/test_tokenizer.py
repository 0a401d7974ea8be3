"""The tokenizer built from GGUF metadata against transformers' GGUF-loaded SmolLM2 tokenizer:
encode, decode, streaming decode and the chat template; plus the Hugging Face directory path."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import pre_tokenizers

from kvrelay.engine.models.loader import default_model_path
from kvrelay.engine.models.tokenizer import IncrementalDecoder, Tokenizer
from kvrelay.errors import CorruptModelError, InvalidRequestError

STRINGS = [
    "",
    " ",
    "Hello world",
    "Hello, World! How are you?",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self) -> None:\n\t\tpass  # tabs\n\n\n",
    "    four leading spaces and trailing   ",
    "x = [1, 22, 333, 4444, 55555]; y = 3.14159e-10; z = 0xFF",
    "2024-01-31T12:34:56Z and 10,000,000 and 1.5k",
    "it's they're we've I'm you'll he'd DON'T",
    "naïve café résumé — “quotes” ‘single’ … ß",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Привет мир! Ελληνικά. עברית. العربية",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>name<file_sep>file",
    "not special: <|im_start |> <|im_end",
    "\r\n\r\nwindows\r\nlines\ttab\u00a0nbsp\u3000ideographic",
    "zero\u200bwidth and combining e\u0301",
    "```python\nprint('hi')\n```",
    "https://example.com/path?query=1&b=2#frag",
    "    return {'key': value, \"other\": [None, True, False]}",
]
# A space before a non-ASCII numeric character: see test_digits_split_like_smollm2.
NUMERIC_STRINGS = ["½ ² ٣ Ⅷ", "x ¼ and y ³", "arabic ١٢٣ digits", " ⅓"]
SMOLLM2_TEMPLATE_CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Write code"},
        {"role": "assistant", "content": "def f():\n    pass"},
        {"role": "user", "content": "Now in Rust, with 😀"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def gguf_fields(gguf_path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(gguf_path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def ours(gguf_fields: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_fields(gguf_fields)


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def smollm2_reference(reference: Any) -> Any:
    """transformers' tokenizer with the pre-tokenizer SmolLM2's own tokenizer.json declares
    (digits split one by one, then GPT-2's byte-level regex); llama.cpp's "smollm" is the same.
    transformers' GGUF converter has no "smollm" entry and keeps plain GPT-2 splitting."""
    fixed = reference.backend_tokenizer.__class__.from_str(reference.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return fixed


def random_strings(count: int, seed: int = 0) -> list[str]:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r  ",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éüñçßøåœ日本語中文한국어ПриветΩ≈√∞€£¥",
        "😀👍🏽🇫🇷👨‍👩‍👧\u200d\u0301",
        "½²٣Ⅷ¼",
    ]
    rng = random.Random(seed)
    return [
        "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40)))
        for _ in range(count)
    ]


@pytest.mark.parametrize("text", STRINGS)
def test_encode_matches_transformers(ours: Tokenizer, reference: Any, text: str) -> None:
    assert ours.encode(text) == reference.encode(text)
    assert ours.encode(text, add_special_tokens=False) == reference.encode(
        text, add_special_tokens=False
    )


def test_digits_split_like_smollm2(ours: Tokenizer, smollm2_reference: Any) -> None:
    for text in [*STRINGS, *NUMERIC_STRINGS, *random_strings(300)]:
        assert ours.encode(text) == smollm2_reference.encode(text).ids, text


def test_special_tokens_are_single_ids(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.token_to_id("<|im_start|>") == 1
    assert ids[-1] == ours.token_to_id("<|im_end|>") == 2
    assert ours.bos_token_id == 1
    assert ours.eos_token_ids == (2,)
    assert ours.vocab_size == 49152


@pytest.mark.parametrize("text", STRINGS + NUMERIC_STRINGS)
def test_decode_round_trips(ours: Tokenizer, reference: Any, text: str) -> None:
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)


def test_decode_skips_special_tokens(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids) == "user\nhi"


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decode_equals_full_decode(ours: Tokenizer, skip: bool) -> None:
    for text in [*STRINGS, *NUMERIC_STRINGS, *random_strings(100, seed=1)]:
        ids = ours.encode(text)
        decoder = IncrementalDecoder(ours, skip_special_tokens=skip)
        pieces = [decoder.push(i) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
        assert decoder.text == "".join(pieces)
        assert not any("\ufffd" in p for p in pieces), "emitted a partial character"


def test_incremental_decode_holds_back_partial_characters(ours: Tokenizer) -> None:
    ids = ours.encode("😀")
    assert len(ids) > 1  # a 4-byte character spread over byte tokens
    decoder = IncrementalDecoder(ours)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "😀"
    assert decoder.flush() == ""


def test_incremental_update_takes_the_whole_list(ours: Tokenizer) -> None:
    ids = ours.encode("Hello 😀 world<|im_end|>")
    decoder = IncrementalDecoder(ours)
    pieces = [decoder.update(ids[: n + 1]) for n in range(len(ids))]
    assert "".join(pieces) + decoder.flush() == "Hello 😀 world"
    assert decoder.text == "Hello 😀 world"


def test_flush_emits_an_unfinished_character(ours: Tokenizer) -> None:
    ids = ours.encode("😀")
    decoder = IncrementalDecoder(ours)
    assert decoder.extend(ids[:1]) == ""
    assert decoder.flush() == ours.decode(ids[:1])


@pytest.mark.parametrize("chat", SMOLLM2_TEMPLATE_CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    ours: Tokenizer, reference: Any, chat: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    expected = reference.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


def test_missing_chat_template_is_a_clear_error(gguf_fields: dict[str, Any]) -> None:
    fields = {k: v for k, v in gguf_fields.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_fields(fields)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers(gguf_fields: dict[str, Any]) -> None:
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{% generation %}{{ messages[0] | tojson }}{% endgeneration %}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% endfor %}"
        "{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y')|length }}"
    )
    tok = Tokenizer.from_gguf_fields({**gguf_fields, "tokenizer.chat_template": template})
    rendered = tok.apply_chat_template([{"role": "user", "content": "<b>é</b>"}])
    assert rendered == '{"role": "user", "content": "<b>é</b>"}<|im_start|>|<|im_end|>|4'
    with pytest.raises(InvalidRequestError, match="one message only"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


def test_template_is_sandboxed(gguf_fields: dict[str, Any]) -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer.from_gguf_fields({**gguf_fields, "tokenizer.chat_template": escape})
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


def test_add_bos_token_from_metadata(gguf_fields: dict[str, Any]) -> None:
    tok = Tokenizer.from_gguf_fields({**gguf_fields, "tokenizer.ggml.add_bos_token": True})
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id


def test_unsupported_tokenizer_model(gguf_fields: dict[str, Any]) -> None:
    with pytest.raises(CorruptModelError, match="'llama' is not supported"):
        Tokenizer.from_gguf_fields({**gguf_fields, "tokenizer.ggml.model": "llama"})
    with pytest.raises(CorruptModelError, match="no tokens or no merges"):
        Tokenizer.from_gguf_fields({**gguf_fields, "tokenizer.ggml.merges": []})


def test_unknown_pre_tokenizer_warns_and_splits_like_gpt2(
    gguf_fields: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_gguf_fields({**gguf_fields, "tokenizer.ggml.pre": "made-up"})
    assert "made-up" in caplog.text
    assert tok.encode("Hello world") == [19556, 905]


def test_llama3_pre_tokenizer_groups_digits_by_three(gguf_fields: dict[str, Any]) -> None:
    tok = Tokenizer.from_gguf_fields({**gguf_fields, "tokenizer.ggml.pre": "llama-bpe"})
    pieces = tok.backend.pre_tokenizer.pre_tokenize_str("abc 12345")
    assert [p for p, _ in pieces] == ["abc", "Ġ", "123", "45"]


def test_hf_dir_round_trip(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    assert again is not None
    for text in STRINGS:
        assert again.encode(text) == ours.encode(text)
    assert again.eos_token_ids == ours.eos_token_ids
    assert again.bos_token_id == ours.bos_token_id
    assert again.chat_template == ours.chat_template
    chat = SMOLLM2_TEMPLATE_CHATS[2]
    assert again.apply_chat_template(chat) == ours.apply_chat_template(chat)


def test_hf_dir_config_variants(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save(tmp_path)
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|endoftext|>",
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok is not None
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == (0, 2)
    assert tok.apply_chat_template([]) == "D"


def test_hf_dir_chat_template_file(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok is not None
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    assert Tokenizer.from_hf_dir(tmp_path) is None


def test_hf_dir_with_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="cannot read the tokenizer"):
        Tokenizer.from_hf_dir(tmp_path)


def test_tokenizer_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, kvrelay.engine.models.tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
