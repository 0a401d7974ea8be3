"""Model definitions and checkpoint loaders (Llama family). torch lives here and in runner/ only.

This package's __init__ imports nothing so that torch-free modules inside it (the tokenizer)
can be imported without torch.
"""
