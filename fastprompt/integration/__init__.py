"""Model integration: attention function, architectures, prompt modules, patching."""
