"""Router: KV-aware worker selection (pure policy), its state (prefix index + active load)
and, later, the async service around them. Layer L3: imports kv, observe, protocol, config
and errors; never the engine."""
