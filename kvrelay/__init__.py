"""kvrelay: LLM serving with KV-cache-aware routing and an explained KV cache hit rate.

`kvrelay.LLM` and `kvrelay.SamplingParams` are the offline API. They are resolved lazily so
that importing a torch-free module (e.g. `kvrelay.kv.hashing`) never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvrelay.engine.llm import LLM
    from kvrelay.protocol import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvrelay.engine.llm import LLM

        return LLM
    if name in ("SamplingParams", "RequestOutput"):
        from kvrelay import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'kvrelay' has no attribute {name!r}")
