"""Running sums of matrix products over calibration tokens: float32 GEMMs, float64 totals.

Second and cross moments (reconstruct.Gram, targets.CrossMoment) add one product aᵀb per micro-batch.
The products run in float32 (sgemm: about twice the speed of float64) straight into a float32 buffer
(`addmm_`, no temporary), which is folded into the float64 total every `FLUSH_TOKENS` tokens: float32
then never sums more than a few thousand products, far below where it loses anything a fit damped by
1 % of mean(diag H) sees, and the float64 conversion runs once per flush, not once per micro-batch.
"""
from __future__ import annotations

import torch

FLUSH_TOKENS = 8192  # tokens summed in float32 before the buffer is folded into the total


class ProductSum:
    """Σ aᵀ b over micro-batches (a: [N, p], b: [N, q]) as a [p, q] total in `dtype`."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self.total: torch.Tensor | None = None  # [p, q] in dtype
        self._buf: torch.Tensor | None = None  # [p, q] float32, products not yet folded in
        self._pending = 0  # tokens in _buf

    @torch.no_grad()
    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.total is None:
            self.total = torch.zeros(a.shape[1], b.shape[1], dtype=self.dtype, device=a.device)
        if a.dtype == torch.float64 or self.dtype == torch.float32:  # no separate buffer needed
            self.total.addmm_(a.T.to(self.dtype), b.to(self.dtype))
            return
        if self._buf is None:
            self._buf = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
        self._buf.addmm_(a.T.float(), b.float())
        self._pending += a.shape[0]
        if self._pending >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self._buf is not None and self._pending:
            self.total += self._buf.to(self.dtype)
            self._buf.zero_()
            self._pending = 0

    def result(self) -> torch.Tensor:
        """The total so far (all pending products folded in); the buffer is released."""
        self.flush()
        self._buf = None
        if self.total is None:
            raise ValueError("no calibration inputs reached this module")
        return self.total


__all__ = ["FLUSH_TOKENS", "ProductSum"]
