"""KV-cache contracts shared by engine, router, sim and bench: block hashing and KV events.

Pure Python, no torch. Imports only layer L0 (protocol, config, errors).
"""
