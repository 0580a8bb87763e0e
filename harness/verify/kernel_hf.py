"""transformers' own attention functions, as the kernel matrix's reference (kernels.py, grads.py).

    the mask    transformers.masking_utils' mask functions, made a boolean (B, 1, Sq, Sk) by its sdpa_mask, with the
                queries at positions Sk - Sq .. Sk - 1 (bottom-right aligned, as a KV cache places them):
                causal, window (W - 1, 0)     sliding_window_causal_mask_function(W): Mistral's and Gemma's layers
                causal, window (-1, r)        causal_mask_function (r >= 0 adds nothing to causal)
                causal=False, window (w, w)   sliding_window_bidirectional_mask_function(w)
                causal=False, other windows   and_masks(bidirectional_mask_function, sliding_window_overlay(left + 1)
                                              for the left edge, and `_look_ahead(right)`, ours, for the right edge:
                                              masking_utils bounds a look-ahead only symmetrically)
                padding                       its padding_mask_function (sdpa_mask adds it)
    forward     plain      llama's eager_attention_forward in the dtype; sdpa_attention_forward in float64 (and, for
                           gradients, in the dtype: transformers' other path)
                softcap    gemma2's eager_attention_forward(softcap=...)
                sinks      gpt_oss's eager_attention_forward (module.sinks, float32 as the contract gives them)
                both       gemma2's function with the sink as one more key: k = 0 (score 0, and gemma2's cap keeps 0
                           at 0), v = 0 (no value), its mask entry the sink's logit (gemma2 adds the mask after the
                           cap): exactly gpt_oss's extra logit column. No transformers function has both.
    float64     the same functions on float64 tensors. llama's and gemma2's eager functions softmax in float32
                whatever their input (`softmax(..., dtype=torch.float32)`): the plain float64 path is therefore
                sdpa's (its math kernel keeps float64), and gemma2's runs with that one upcast kept in float64
                (`float64_softmax`, from reference/float64.py); every other line of it runs as written. gpt_oss's
                softmaxes in its input's dtype: run as is.
    lse         transformers returns none: the float64 logsumexp of the same scores (capped as gemma2 caps them),
                the sink's logit one more term, over the allowed keys
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import masking_utils as mu
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.llama import modeling_llama

from harness.reference import float64 as reference_float64

PATHS = ("eager", "float64", "sdpa")  # the scenario's dtype; float64; transformers' other path in the dtype


def bounds(window) -> tuple[int | None, int | None]:
    """(left, right) with None for an unbounded side (-1, any negative, or None: FlashAttention's convention)."""
    if window is None:
        return None, None
    return tuple(None if w is None or w < 0 else int(w) for w in window)  # type: ignore[return-value]


def _look_ahead(right: int) -> Callable:
    """key j visible from position p only if j <= p + right (masking_utils has no one-sided version)."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx <= q_idx + right

    return inner_mask


def mask_function(causal: bool, window) -> Callable:
    """The masking_utils mask function of (causal, window): see the module's docstring."""
    left, right = bounds(window)
    if causal:
        return mu.causal_mask_function if left is None else mu.sliding_window_causal_mask_function(left + 1)
    if left is not None and left == right:
        return mu.sliding_window_bidirectional_mask_function(left)
    parts = [mu.bidirectional_mask_function]
    if left is not None:
        parts.append(mu.sliding_window_overlay(left + 1))  # j > p - (left + 1), i.e. j >= p - left
    if right is not None:
        parts.append(_look_ahead(right))
    return mu.and_masks(*parts) if len(parts) > 1 else parts[0]


def allowed(B: int, Sq: int, Sk: int, causal: bool, window, mask) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool: which keys each query may see, as masking_utils builds it."""
    keep = mu.sdpa_mask(batch_size=B, q_length=Sq, kv_length=Sk, q_offset=Sk - Sq, kv_offset=0,
                        mask_function=mask_function(causal, window),
                        attention_mask=None if mask is None else mask.bool(), allow_is_causal_skip=False,
                        allow_is_bidirectional_skip=False)  # fmt: skip
    return keep.expand(B, 1, Sq, Sk)


def additive(keep4: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(keep4.shape, dtype=dtype).masked_fill(~keep4, torch.finfo(dtype).min)


def module(H: int, Hkv: int, d: int, sinks: torch.Tensor | None = None) -> torch.nn.Module:
    """What the eager functions read of their module: the group size, training (dropout off), head_dim, sinks."""
    m = torch.nn.Module()
    m.num_key_value_groups, m.training, m.is_causal, m.head_dim = H // Hkv, False, False, d
    m.sinks = sinks
    return m


def float64_softmax():
    """gemma2's eager function, run on float64 tensors, softmaxes in float64 (reference/float64.py)."""
    return reference_float64.float64_softmax(modeling_gemma2)


def forward(q, k, v, keep4, scale: float, softcap: float = 0.0, sinks: torch.Tensor | None = None,
            path: str = "eager") -> torch.Tensor:  # fmt: skip
    """(B, H, Sq, d): transformers' attention on q, k, v as given (float64 ones for path float64). sinks: float32 [H]
    (cast to float64 on the float64 path). path "sdpa" exists for the plain case only."""
    B, H, Sq, d = q.shape
    f64 = path == "float64"
    dt = torch.float64 if f64 else q.dtype
    if sinks is not None:
        sinks = sinks.double() if f64 else sinks.float()
    if softcap and sinks is not None:
        zero = torch.zeros(*k.shape[:2], 1, d, dtype=k.dtype)
        k, v = torch.cat([k, zero], 2), torch.cat([v, zero], 2)
        sink_col = sinks.reshape(1, H, 1, 1).expand(B, H, Sq, 1)
        bias = torch.cat([additive(keep4, sink_col.dtype).expand(B, H, Sq, -1), sink_col], -1)
        return _gemma2(q, k, v, bias, scale, softcap, f64)
    bias = additive(keep4, dt)
    if softcap:
        return _gemma2(q, k, v, bias, scale, softcap, f64)
    if sinks is not None:
        m = module(H, k.shape[1], d, sinks)
        return modeling_gpt_oss.eager_attention_forward(m, q, k, v, bias, scaling=scale)[0].transpose(1, 2)
    m = module(H, k.shape[1], d)
    if f64 or path == "sdpa":
        return sdpa_attention_forward(m, q, k, v, bias, scaling=scale)[0].transpose(1, 2)
    return modeling_llama.eager_attention_forward(m, q, k, v, bias, scaling=scale)[0].transpose(1, 2)


def _gemma2(q, k, v, bias, scale, softcap, f64: bool) -> torch.Tensor:
    m = module(q.shape[1], k.shape[1], q.shape[-1])
    with float64_softmax() if f64 else _nothing():
        out = modeling_gemma2.eager_attention_forward(m, q, k, v, bias, scaling=scale, softcap=softcap)[0]
    return out.transpose(1, 2)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def has_sdpa_path(softcap: float, sinks) -> bool:
    """transformers' sdpa path computes plain (masked) attention only."""
    return not softcap and sinks is None


def lse(q, k, keep4, scale: float, softcap: float = 0.0, sinks: torch.Tensor | None = None,
        float64: bool = True) -> torch.Tensor:  # fmt: skip
    """(B, H, Sq): the natural log of the softmax's whole denominator, the sink's term included. float64: every step
    in float64; else as transformers' eager path has the scores (the matmul in q's dtype), the rest in float32."""
    g = q.shape[1] // k.shape[1]
    if float64:
        sc = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-2, -1)) * scale
    else:
        sc = (q @ k.repeat_interleave(g, 1).transpose(-2, -1)).float() * scale
    if softcap:
        sc = softcap * torch.tanh(sc / softcap)  # gemma2's cap (it divides, tanh, multiplies)
    sc = sc.masked_fill(~keep4, float("-inf"))
    if sinks is not None:
        sc = torch.cat([sc, sinks.to(sc.dtype).reshape(1, -1, 1, 1).expand(*sc.shape[:3], 1)], -1)
    return torch.logsumexp(sc, dim=-1)
