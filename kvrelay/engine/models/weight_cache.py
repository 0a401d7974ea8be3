"""On-disk cache of converted checkpoints: float32 weights as safetensors, the arch config and
extras as JSON, the tokenizer as a Hugging Face style directory.

Owns: the cache key (source file path, size and mtime, plus the cache format), the layout of one
entry under `kvrelay.config.weight_cache_dir()`, atomic writes (a temporary sibling directory
renamed into place) and tolerant reads (a damaged entry is deleted and rebuilt, never fatal).
Must not import the runner, the scheduler or anything above engine.models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from kvrelay.config import weight_cache_dir
from kvrelay.engine.models.config import LoadedModel, ModelArchConfig
from kvrelay.engine.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the cached layout or the conversion changes


def cache_path(path: Path) -> Path:
    """One directory per source file version: its name, size and mtime, and the cache format
    (the same file installed in two environments shares one entry)."""
    stat = path.stat()
    key = f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return weight_cache_dir() / f"{path.stem}-{digest}"


def read_cached(cache: Path) -> LoadedModel | None:
    """The cached model, or None (after deleting the entry) when it cannot be read."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((cache / "model.json").read_text(encoding="utf-8"))
        if meta.get("format") != _CACHE_FORMAT:
            raise ValueError(f"cache format {meta.get('format')} != {_CACHE_FORMAT}")
        arch_fields = dict(meta["arch"])
        arch_fields["eos_token_ids"] = tuple(arch_fields["eos_token_ids"])
        arch = ModelArchConfig(**arch_fields)
        state_dict = load_file(str(cache / "model.safetensors"))
        tokenizer = Tokenizer.from_hf_dir(cache / "tokenizer")
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        logger.warning("ignoring damaged weight cache %s (%s); rebuilding it", cache, exc)
        shutil.rmtree(cache, ignore_errors=True)
        return None
    return LoadedModel(meta["name"], arch, state_dict, tokenizer, dict(meta["extra"]))


def write_cached(cache: Path, model: LoadedModel) -> None:
    """Write into a temporary sibling directory, then rename it into place (atomic)."""
    from safetensors.torch import save_file

    tmp: Path | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
        save_file(model.state_dict, str(tmp / "model.safetensors"))
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / "tokenizer")
        meta = {
            "format": _CACHE_FORMAT,
            "name": model.name,
            "arch": dataclasses.asdict(model.arch),
            "extra": model.extra,
        }
        (tmp / "model.json").write_text(json.dumps(meta), encoding="utf-8")
        os.rename(tmp, cache)
        tmp = None
        logger.info("cached dequantized weights in %s", cache)
    except Exception as exc:  # read-only or full disk, a concurrent writer won the rename, ...
        if not cache.is_dir():  # caching is an optimisation: never fail the load for it
            logger.warning(
                "could not cache weights in %s (%s); next load re-reads GGUF", cache, exc
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
