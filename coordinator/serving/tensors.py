"""Small tensor helpers the serving engine shares."""

from __future__ import annotations

import torch


def zero_pad(tensor: torch.Tensor, size: int, dim: int, *, left: bool) -> torch.Tensor:
    """``tensor`` with zeros added on one side of ``dim`` up to ``size`` (itself when already that size)."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    zeros = tensor.new_zeros(shape)
    return torch.cat([zeros, tensor] if left else [tensor, zeros], dim=dim)
