"""The explicit masks the references run with: 4-D additive (0 keep, finfo.min drop).

transformers' eager attention with attention_mask=None is NOT causal, and its sliding_window argument is read by the
flash kernels only: eager and sdpa take the window from the mask, as the family's Model builds it
(create_sliding_window_causal_mask for a sliding layer: key j visible from query i iff i - W < j <= i, i.e.
masking_utils' sliding_window_causal_mask_function(W)). Queries are the last Sq of Sk keys (bottom-right, as a KV
cache places them); padding follows the tokenizer's convention (attention_mask [B, Sk], 1 = token, 0 = padding).
"""

from __future__ import annotations

import torch


def additive_mask(Sq: int, Sk: int, attention_mask: torch.Tensor | None = None, B: int = 1, dtype=torch.float32,
                  window: int | None = None) -> torch.Tensor:  # fmt: skip
    """[B, 1, Sq, Sk] additive mask: causal (bottom-right), within `window` keys when given, plus padding."""
    i = torch.arange(Sq)[:, None] + (Sk - Sq)  # (Sq, 1): each query's index among the keys
    j = torch.arange(Sk)[None, :]  # (1, Sk)
    keep = j <= i
    if window:
        keep = keep & (j > i - window)  # transformers' sliding_window=W: the W most recent keys, itself included
    keep = keep[None, None]  # (1, 1, Sq, Sk)
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]  # (B, 1, Sq, Sk)
    keep = keep.expand(max(B, keep.shape[0]), 1, Sq, Sk)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
