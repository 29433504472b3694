"""Modules with the parameter names of the libraries they replace, so state dicts load both ways."""
from vitfast.nn.layer_norm import LayerNorm

__all__ = ["LayerNorm"]
