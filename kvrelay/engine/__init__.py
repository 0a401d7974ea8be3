"""The native engine: request state, block pool, KV cache manager, scheduler, core loop,
and (in runner/ and models/) the torch code."""
