"""A tiny byte-level BPE tokenizer for serving tests, saved next to a tiny model.

Owns: `add_tiny_tokenizer(model_dir, vocab_size)` — trains a byte-level BPE on a few code
and chat strings (vocab <= the tiny model's), adds `<pad>`/`<s>`/`</s>` as ids 0/1/2 (the
tiny models' pad/bos/eos) and writes tokenizer.json + tokenizer_config.json with a chat
template, so `load_model(dir)` attaches it. Imports tokenizers only.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path: str) -> None:\n",
    "Hello, how are you today? I am fine, thank you. The quick brown fox jumps over the dog.",
    "<|system|>\nYou are a helpful coding assistant.\n<|user|>\nWrite a function.\n<|assistant|>\n",
    "for i in range(10):\n    print(i * 2)  # double\nreturn {'key': [1, 2, 3]}\n",
]


def add_tiny_tokenizer(model_dir: Path, vocab_size: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(model_dir / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir
