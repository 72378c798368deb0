"""A batch as the tensor core sees it: anything the user's loss takes (a tensor, or tuples, lists and dicts of
tensors), moved to the model's device as it is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Batch = Any  # a tensor, or tuples, lists and dicts of tensors


def move(batch: Batch, device: torch.device | str) -> Batch:
    """A batch of any structure with its tensors on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move(v, device) for v in batch)
    if isinstance(batch, list):
        return [move(v, device) for v in batch]
    return batch
