"""End-to-end fixtures: a tiny random Llama with a tiny tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model_dir
from tests.tiny_tokenizer import add_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_tiny_model_dir(path, kind="llama")
    add_tiny_tokenizer(path)
    return path
