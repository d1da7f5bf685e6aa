"""Drop-in 4-bit layers."""

from .linear import FP4Linear, TorchFP4Linear

__all__ = ["FP4Linear", "TorchFP4Linear"]
