"""Router: KV-aware worker selection (pure policy), its state (prefix index + active load),
and the async service that feeds the state from every worker's KV events and closes each
request's hit-rate ledger row. Layer L3: imports kv, observe, runtime, protocol, config and
errors; never the engine, the worker or the frontend."""
