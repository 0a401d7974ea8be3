"""Frontend: the OpenAI-compatible HTTP API (FastAPI + uvicorn), tokenization and chat
templates, SSE streaming, worker choice, health / readiness / Prometheus metrics.

Layer L4: imports runtime, observe, protocol and the (torch-free) tokenizer; never the
engine core or the worker. The only package that imports the web framework.
"""
