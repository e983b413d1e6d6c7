"""Collectives without autograd for the callbacks' cross-rank checks and gathers."""

from __future__ import annotations

import torch


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``[W, *tensor.shape]``: every rank's ``tensor`` (same shape on every rank), rank by rank; ``[1, ...]``
    outside a process group. The plain c10d ``all_gather`` (no gradient flows through it): Lightning's
    ``LightningModule.all_gather`` calls ``torch.distributed.nn.functional.all_gather``, deprecated in torch 2.10."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.unsqueeze(0)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)
