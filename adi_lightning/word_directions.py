"""Word directions: keep the identifier's change orthogonal to a few words' token embeddings.

Pure tensor functions, no model; :class:`~adi_lightning.callbacks.SubjectWordsCallback` applies them
after each optimizer step (``model.subject_words``; docs/method.md "Subject words").
"""

from __future__ import annotations

import torch

#: A singular value at or below this fraction of the largest adds no direction (a row dependent on the others).
RANK_RTOL = 1e-6


def word_basis(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[D, K']`` (fp64) of the span of ``rows`` ``[K, D]``: K' is the rank (rows that
    are combinations of the others add no column), the left singular vectors whose singular value exceeds
    :data:`RANK_RTOL` times the largest (an SVD, not QR: a pivot-free QR of a rank-deficient matrix can drop
    part of the span). ValueError when ``rows`` is not ``[K, D]`` with K >= 1, or is all zero."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"word rows must be [K, D] with K >= 1, got shape {tuple(rows.shape)}")
    u, s, _ = torch.linalg.svd(rows.detach().double().T, full_matrices=False)  # u [D, min(D, K)]
    if not bool((s > 0).any()):
        raise ValueError("the word rows are all zero: they span no direction")
    return u[:, s > RANK_RTOL * s.max()].contiguous()


def without_directions(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``delta`` ``[R, D]`` minus its component in the span of ``basis`` ``[D, K]`` (orthonormal columns,
    :func:`word_basis`): ``delta − (delta B) Bᵀ``, computed in fp64, returned in ``delta``'s dtype and
    device. Idempotent; a row orthogonal to every column is returned unchanged."""
    b = basis.to(device=delta.device, dtype=torch.float64)
    d = delta.double()
    return (d - (d @ b) @ b.T).to(delta.dtype)
