"""From scores to probabilities: masks as booleans (True = may attend), the logit cap, and a softmax with an optional
sink that gives zeros, never NaN, for rows with nothing to attend to.

Causal masks are bottom-right aligned: with Sq queries against Sk >= Sq keys (decoding with a cache), query i
sits at key index p = Sk - Sq + i and sees keys 0 .. p. Padding follows the tokenizer's convention:
attention_mask [B, Sk] with 1 = token, 0 = padding; padded keys are never attended to.

The kernel contract's three variants (impl/__init__.py), as the math every built-in follows:
- window (left, right), FlashAttention's window_size: the query at position p sees key j only if
  p - left <= j <= p + right; a negative side (-1) or None is unbounded, as in FlashAttention. With causal the
  two are ANDed, so transformers' sliding_window=W on a causal layer is (W - 1, 0).
- softcap c > 0: after the scale, s = c * tanh(s / c) (Gemma 2), before the mask is applied.
- sinks [H]: one logit per query head joins the softmax's denominator with no value (GPT-OSS):
  p_j = exp(s_j - m) / (exp(sink - m) + sum_j exp(s_j - m)), m = max(max_j s_j, sink).
"""

from __future__ import annotations

import torch


def causal(Sq: int, Sk: int, device=None) -> torch.Tensor:
    """[Sq, Sk] bool, bottom-right aligned."""
    i = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)  # (Sq, 1) query index among the keys
    j = torch.arange(Sk, device=device)[None, :]  # (1, Sk)
    return j <= i


def bounds(window, causal: bool = False) -> tuple[int | None, int | None]:
    """A window (left, right) or None -> (left, right) as ints or None (unbounded), causal folded into right.

    Causal means right <= 0: a key after the query is never seen, whatever the window allows.
    """
    left = right = None
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2):
            raise ValueError(f"window must be a pair (left, right) of ints (-1 or None: unbounded), got {window!r}")
        left, right = (None if w is None or int(w) < 0 else int(w) for w in window)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def window_mask(Sq: int, Sk: int, window, device=None) -> torch.Tensor:
    """[Sq, Sk] bool: p - left <= j <= p + right for query position p = Sk - Sq + i (no causal; see bounds)."""
    left, right = bounds(window)
    p = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)  # (Sq, 1)
    j = torch.arange(Sk, device=device)[None, :]  # (1, Sk)
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if left is not None:
        keep &= j >= p - left
    if right is not None:
        keep &= j <= p + right
    return keep


def padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, Sk] of 1/0 -> [B, 1, 1, Sk] bool: which keys are real tokens."""
    return attention_mask.bool()[:, None, None, :]


def build(
    Sq: int,
    Sk: int,
    attention_mask: torch.Tensor | None = None,
    device=None,
    *,
    is_causal: bool = True,
    window=None,
) -> torch.Tensor:
    """Causal (unless is_causal=False), window (when given) and padding: [1 or B, 1, Sq, Sk] bool."""
    m = causal(Sq, Sk, device) if is_causal else torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if window is not None:
        m = m & window_mask(Sq, Sk, window, device)
    m = m[None, None]  # (1, 1, Sq, Sk)
    if attention_mask is not None:
        m = m & padding(attention_mask.to(device))  # (B, 1, Sq, Sk)
    return m


def check_sinks(sinks: torch.Tensor | None, H: int) -> None:
    """sinks is None or one logit per query head: a clear error, never a silent broadcast, for any other shape."""
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be a tensor [H] = [{H}] (one logit per query head), got {tuple(sinks.shape)}")


def cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap * tanh(scores / softcap): scores squashed into (-softcap, softcap); softcap 0 (or None) is off."""
    if not softcap:
        return scores
    return torch.tanh(scores / softcap) * softcap


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim of float32 scores where `allowed`; rows with nothing allowed give zeros.

    The textbook form: subtract the row max (stability), exponentiate, normalise. sinks (None, or logits that
    broadcast against scores[..., :1], e.g. (1, H, 1, 1)) add exp(sink) to each row's denominator: one more
    logit with no value, so the row max includes it and a row with nothing allowed still gives zeros.
    """
    s = scores.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    if sinks is not None:
        m = torch.maximum(m, sinks)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked row: any finite shift
    e = torch.exp(s - m)  # exp(-inf) = 0 where masked
    z = e.sum(dim=-1, keepdim=True)
    if sinks is not None:
        z = z + torch.exp(sinks - m)  # the sink's share of the denominator (it has no value to add to the output)
    return e / torch.where(z > 0, z, torch.ones_like(z))
