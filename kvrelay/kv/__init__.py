"""KV-cache contracts shared by engine, router, sim and bench: block hashing, KV events, the
prefix index, and the KV block transfer plane (format, `Transport`, in-process and TCP).

Pure Python, no torch. Imports only layer L0 (protocol, config, errors).
"""
