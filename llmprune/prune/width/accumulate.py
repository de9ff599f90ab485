"""Running sums of matrix products over calibration tokens: float32 GEMMs, float64 totals.

Second and cross moments (reconstruct.Gram, targets.CrossMoment) add one product aᵀb per micro-batch.
The products run in float32 (sgemm: about twice the speed of float64) straight into a float32 buffer
(`addmm_`, no temporary), which is folded into the float64 total every `FLUSH_TOKENS` tokens: float32
then never sums more than a few thousand products, far below where it loses anything a fit damped by
1 % of mean(diag H) sees, and the float64 conversion runs once per flush, not once per micro-batch.
A second moment (a = b, `symmetric=True`) computes only its upper triangle, as a staircase of row panels
(rows s:s+B, columns s:), and mirrors it once at the end: ~40 % fewer flops for an FFN-wide H (torch has
no syrk).
"""
from __future__ import annotations

import torch

FLUSH_TOKENS = 8192  # tokens summed in float32 before the buffer is folded into the total
PANEL = 256  # rows per panel of a symmetric product (smaller panels save flops, but run slower GEMMs)


class ProductSum:
    """Σ aᵀ b over micro-batches (a: [N, p], b: [N, q]) as a [p, q] total in `dtype`; `symmetric`: Σ aᵀ a,
    called as add(a, a)."""

    def __init__(self, dtype: torch.dtype = torch.float64, symmetric: bool = False):
        self.dtype, self.symmetric = dtype, symmetric
        self.total: torch.Tensor | None = None  # [p, q] in dtype
        self._buf: torch.Tensor | None = None  # [p, q] float32, products not yet folded in
        self._pending = 0  # tokens in _buf

    @torch.no_grad()
    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.total is None:
            self.total = torch.zeros(a.shape[1], b.shape[1], dtype=self.dtype, device=a.device)
        if self.symmetric and a is not b:
            raise ValueError("a symmetric product sum adds aᵀa: call add(a, a)")
        if a.dtype == torch.float64 or self.dtype == torch.float32:  # no separate buffer needed
            a = a.to(self.dtype)
            self._product(self.total, a, a if self.symmetric else b.to(self.dtype))
            return
        if self._buf is None:
            self._buf = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
        a = a.float()
        self._product(self._buf, a, a if self.symmetric else b.float())
        self._pending += a.shape[0]
        if self._pending >= FLUSH_TOKENS:
            self.flush()

    def _product(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """out += aᵀb; for a symmetric sum only the panels on and above the diagonal."""
        if not self.symmetric:
            out.addmm_(a.T, b)
            return
        p = a.shape[1]
        for s in range(0, p, PANEL):  # rows s:s+PANEL, columns s: (the upper triangle and the diagonal block)
            out[s:s + PANEL, s:].addmm_(a[:, s:s + PANEL].T, a[:, s:])

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
        if self.symmetric:  # only the upper triangle was summed: mirror it
            return torch.triu(self.total) + torch.triu(self.total, 1).T
        return self.total


__all__ = ["FLUSH_TOKENS", "PANEL", "ProductSum"]
