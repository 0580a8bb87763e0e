"""Masks as booleans (True = may attend) and a softmax that gives zeros, never NaN, for fully masked rows.

Causal masks are bottom-right aligned: with Sq queries against Sk >= Sq keys (decoding with a cache), query i
sits at key index Sk - Sq + i and sees keys 0 .. Sk - Sq + i. Padding follows the tokenizer's convention:
attention_mask [B, Sk] with 1 = token, 0 = padding; padded keys are never attended to.
"""

from __future__ import annotations

import torch


def causal(Sq: int, Sk: int, device=None) -> torch.Tensor:
    """[Sq, Sk] bool, bottom-right aligned."""
    i = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)  # (Sq, 1) query index among the keys
    j = torch.arange(Sk, device=device)[None, :]  # (1, Sk)
    return j <= i


def padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, Sk] of 1/0 -> [B, 1, 1, Sk] bool: which keys are real tokens."""
    return attention_mask.bool()[:, None, None, :]


def build(
    Sq: int, Sk: int, attention_mask: torch.Tensor | None = None, device=None, *, is_causal: bool = True
) -> torch.Tensor:
    """Causal (unless is_causal=False) and padding: [1 or B, 1, Sq, Sk] bool."""
    m = causal(Sq, Sk, device) if is_causal else torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    m = m[None, None]  # (1, 1, Sq, Sk)
    if attention_mask is not None:
        m = m & padding(attention_mask.to(device))  # (B, 1, Sq, Sk)
    return m


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of float32 scores where `allowed`; rows with nothing allowed give zeros.

    The textbook form: subtract the row max (stability), exponentiate, normalise.
    """
    s = scores.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked row: any finite shift
    e = torch.exp(s - m)  # exp(-inf) = 0 where masked
    z = e.sum(dim=-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))
