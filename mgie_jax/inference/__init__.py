"""Inference: the expressive instruction (greedy, beam), the edit (JAX), the same edit in PyTorch.

Imports nothing here, so that the PyTorch pipeline runs without JAX."""
