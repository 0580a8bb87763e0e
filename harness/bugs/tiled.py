"""A FlashAttention-2 forward loop written out for injecting its classic bugs: the tiling mistakes of the catalog.

    for each query block: running max m, running sum l, accumulator o
        for each key block up to the diagonal (causal): scores, mask, m' = max(m, rowmax), rescale o and l
    out = o / l

`bug` switches one line: "no_rescale" (o not rescaled by exp(m - m')), "drop_last_block" (S // block blocks),
"diag_mask" (the diagonal tile masked with the tile-local key index), "fp16_row_sum" (the running sum l kept in
float16). Any other value is the correct loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.bugs.pipeline import acc
from impl.gqa import repeat_kv


def flash(q, k, v, attention_mask=None, causal=True, scale=None, *, bug: str, block: int = 128) -> torch.Tensor:
    """A FlashAttention-2 forward (square blocks, causal, Sq == Sk as written) with one of its classic bugs."""
    B, H, S, d = q.shape
    g = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    k, v = repeat_kv(k, g), repeat_kv(v, g)  # (B, H, S, d)
    f = acc(q)
    keep = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, S)
    out = torch.zeros_like(q, dtype=f)  # (B, H, S, d)
    n = S // block if bug == "drop_last_block" else -(-S // block)  # floor division loses the partial block
    for bi in range(n):
        i0, i1 = bi * block, min((bi + 1) * block, S)
        m = torch.full((B, H, i1 - i0, 1), float("-inf"), dtype=f)
        l = torch.zeros(B, H, i1 - i0, 1, dtype=f)
        o = torch.zeros(B, H, i1 - i0, d, dtype=f)
        for bj in range(bi + 1 if causal else n):  # causal: key blocks up to the diagonal
            j0, j1 = bj * block, min((bj + 1) * block, S)
            s = (q[:, :, i0:i1] @ k[:, :, j0:j1].transpose(-2, -1)).to(f) * scale  # (B, H, bq, bk)
            if causal and bj == bi:
                i = torch.arange(i0, i1)[:, None]
                j = torch.arange(j0, j1)[None, :]
                future = (j - j0 > i) if bug == "diag_mask" else (j > i)  # local key index vs global query index
                s = s.masked_fill(future, float("-inf"))
            if keep is not None:
                s = s.masked_fill(~keep[..., j0:j1], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - safe)
            alpha = torch.exp(m - safe)
            l = l * alpha + p.sum(-1, keepdim=True)
            if bug == "fp16_row_sum":
                l = l.half().to(f)  # a float16 buffer for l: "it is only a sum of probabilities"
            o = (o if bug == "no_rescale" else o * alpha) + p @ v[:, :, j0:j1].to(f)  # eq. 6 forgotten
            m = m_new
        out[:, :, i0:i1] = o / torch.where(l > 0, l, torch.ones_like(l))
    return out.to(q.dtype)


def core_step(bug: str, block: int = 128) -> Callable:
    """The loop with `bug`, as the pipeline's `core` step: (q, k, v, mask, causal, scale) -> context."""
    return lambda q, k, v, m, causal, scale: flash(q, k, v, m, causal, scale, bug=bug, block=block)
