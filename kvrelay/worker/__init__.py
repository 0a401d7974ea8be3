"""Worker: a process wrapping one engine in a role (`aggregated` for now), serving generate
requests over the runtime and publishing KV events and load.

Layer L4: imports engine.core (only in `main`), runtime, kv, protocol; never the frontend.
"""
