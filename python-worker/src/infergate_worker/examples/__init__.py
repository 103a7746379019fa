"""Example models: ``echo`` (no dependencies) and ``minilm`` (PyTorch)."""
