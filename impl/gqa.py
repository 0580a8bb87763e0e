"""Grouped-query attention: H query heads share Hkv key/value heads, g = H / Hkv query heads per KV head.

KV head j serves query heads j*g .. j*g + g - 1 (consecutive query heads share a KV head). This is what
transformers' repeat_kv does (an `expand` then `reshape`, i.e. repeat_interleave on the head axis); `repeat`
(tiling) would pair query head h with KV head h % Hkv instead: wrong for every g > 1 except by accident.
"""

from __future__ import annotations

import torch


def groups(H: int, Hkv: int) -> int:
    """g = H / Hkv; a clear error, never a silent broadcast, when it does not divide."""
    if Hkv <= 0 or H % Hkv:
        raise ValueError(
            f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}: each KV head must serve a "
            "whole group of query heads"
        )
    return H // Hkv


def repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, Hkv, S, d) -> (B, Hkv*g, S, d): KV head j copied to query heads j*g .. j*g+g-1 (materialises)."""
    if g == 1:
        return x
    B, Hkv, S, d = x.shape
    return x[:, :, None].expand(B, Hkv, g, S, d).reshape(B, Hkv * g, S, d)  # (B, H, S, d)


def group_queries(q: torch.Tensor, Hkv: int) -> torch.Tensor:
    """(B, H, S, d) -> (B, Hkv, g, S, d): a view, so K/V (B, Hkv, 1, S, d) broadcast without copies."""
    B, H, S, d = q.shape
    return q.view(B, Hkv, H // Hkv, S, d)  # (B, Hkv, g, S, d)
