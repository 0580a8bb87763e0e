"""What makes a family's own module float64-faithful: the steps transformers runs in float32 whatever the input.

    softmax   gemma2's and gemma3's eager functions softmax in float32 (`softmax(..., dtype=torch.float32)`); while
              `float64_softmax(module)` runs, that one upcast keeps float64 (the module's `nn`, read only as
              `nn.functional.*` inside the function, stands in for torch.nn). llama's and the others' plain path
              is sdpa's in float64 (its math kernel keeps float64); gpt_oss's eager softmaxes in its input's dtype.
    q/k norm  Qwen3RMSNorm and Gemma3RMSNorm compute in float32 (`.to(torch.float32)`, `.float()`); the float64
              reference swaps in `RMSNorm64`: the same formula (w * x / rms, or x / rms * (1 + w)) in float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace

import torch


class _Functional:
    """torch.nn.functional, but softmax keeps float64 where the eager function asks for float32."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def softmax(x, dim=None, dtype=None, **kw):
        return torch.nn.functional.softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype,
                                           **kw)  # fmt: skip


@contextmanager
def float64_softmax(module: ModuleType) -> Iterator[None]:
    """The eager function of `module` (a transformers modeling module), run on float64 tensors, softmaxes in
    float64."""
    real = module.nn
    module.nn = SimpleNamespace(functional=_Functional())
    try:
        yield
    finally:
        module.nn = real


class RMSNorm64(torch.nn.Module):
    """The family's q/k RMSNorm over head_dim, in the input's dtype (float64 here): w * x / rms (Qwen3) or
    x / rms * (1 + w) (Gemma 3)."""

    def __init__(self, weight: torch.Tensor, eps: float, plus_one: bool):
        super().__init__()
        self.weight, self.eps, self.plus_one = weight, eps, plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * (1.0 + w) if self.plus_one else w * y
