"""Model integration: everything that reaches into a transformers model (the attention and mask
functions, architectures, the method classes, prompt modules, patching and its undo log, the
per-forward runtime). The public layer uses it through `facade.py` only."""
