"""Model runner: turns a scheduled step into tensors, runs the model on the paged KV cache,
samples. All torch code of the engine lives here and in engine/models.
"""
