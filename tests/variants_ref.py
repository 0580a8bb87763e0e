"""transformers' own functions as the reference for the kernel contract's variants (window, softcap, sinks), for
tests/test_variants_impl.py. Nothing here re-derives the math: each piece is transformers' function, called as its
model calls it.

- window: the boolean mask masking_utils.sdpa_mask builds from masking_utils' mask functions, with the queries at
  q_offset = Sk - Sq (bottom-right aligned, as a KV cache places them). A causal window (W - 1, 0) is
  sliding_window_causal_mask_function(W), exactly what create_sliding_window_causal_mask uses (a test checks the two
  masks are equal). masking_utils has no function for a general (left, right) window, so it is composed from its
  functions: sliding_window_overlay(left + 1) (kv > q - left - 1) AND causal_mask_function shifted by
  add_offsets_to_mask_function(.., q_offset=right) (kv <= q + right); causal=True ANDs causal_mask_function too;
  padding is sdpa_mask's own attention_mask argument (padding_mask_function).
- softcap: gemma2's eager_attention_forward(module, q, k, v, mask, scaling=, softcap=) (cap after the scale, the
  additive mask after the cap). Its softmax runs in float32 whatever the input dtype (softmax(dtype=float32)), so
  its float64 output carries float32 rounding: the float64 checks against it are looser (stated where used).
- sinks: gpt_oss's eager_attention_forward(module, q, k, v, mask, scaling=). It reads the sinks from module.sinks
  (its s_aux keyword is for kernels and ignored by the eager function), concatenates them as one more logit column,
  softmaxes in the logits' dtype and drops the column: float64 inputs give a float64-faithful result. With
  module.sinks = -inf it is plain attention in float64, the float64 reference of the cases with neither softcap
  nor sinks.
The additive mask is 0 / the dtype's min (as transformers' eager_mask builds it), float32's min for float64 inputs:
gemma2's float32 softmax would turn float64's min into -inf and a fully masked row into NaN.
"""

from __future__ import annotations

import torch
from transformers import masking_utils as mu
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager


def mask_function(window, causal: bool):
    """masking_utils' mask function for a window (left, right) (-1 / None: unbounded) and causal."""
    left, right = (None, None) if window is None else (None if w is None or w < 0 else w for w in window)
    if causal and right is not None and right == 0 and left is not None:
        return mu.sliding_window_causal_mask_function(left + 1)  # transformers' sliding_window = left + 1
    parts = [mu.causal_mask_function] if causal else [mu.bidirectional_mask_function]
    if left is not None:
        parts.append(mu.sliding_window_overlay(left + 1))
    if right is not None:
        parts.append(mu.add_offsets_to_mask_function(mu.causal_mask_function, right, 0))
    return mu.and_masks(*parts)


def allowed(B: int, Sq: int, Sk: int, window=None, causal=True, attention_mask=None) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool from masking_utils.sdpa_mask, the queries bottom-right aligned."""
    m = mu.sdpa_mask(batch_size=B, q_length=Sq, kv_length=Sk, q_offset=Sk - Sq, kv_offset=0,
                     mask_function=mask_function(window, causal),
                     attention_mask=None if attention_mask is None else attention_mask.bool(),
                     allow_is_causal_skip=False)  # fmt: skip
    return m.expand(B, 1, Sq, Sk)


def additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, 1, Sq, Sk) -> 0 / min in dtype, as transformers' eager_mask (float32's min for float64: see the module
    docstring)."""
    low = torch.finfo(torch.float32 if dtype == torch.float64 else dtype).min
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, low)


def module_for(H: int, Hkv: int, sinks=None) -> torch.nn.Module:
    m = torch.nn.Module()
    m.num_key_value_groups, m.training = H // Hkv, False
    if sinks is not None:
        m.sinks = sinks  # gpt_oss's eager function reads module.sinks
    return m


def reference(q, k, v, keep, *, scale=None, softcap=0.0, sinks=None) -> torch.Tensor:
    """transformers' attention (B, H, Sq, d) in q's dtype: gemma2's function with softcap, gpt_oss's with sinks
    (module.sinks = -inf when there are none and no softcap: plain attention with a float64-faithful softmax).
    softcap and sinks together: no transformers function has both (a ValueError)."""
    H, Hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    bias = additive(keep, q.dtype)
    if softcap and sinks is not None:
        raise ValueError("no transformers function has both softcap and sinks")
    if softcap:
        out, _ = gemma2_eager(module_for(H, Hkv), q, k, v, bias, dropout=0.0, scaling=scale, softcap=softcap)
    else:
        s = torch.full((H,), float("-inf"), dtype=torch.float32) if sinks is None else sinks
        out, _ = gpt_oss_eager(module_for(H, Hkv, s), q, k, v, bias, scaling=scale, dropout=0.0)
    return out.transpose(1, 2)  # (B, H, Sq, d)


def sliding_window_causal(B: int, S: int, W: int, attention_mask=None) -> torch.Tensor:
    """create_sliding_window_causal_mask itself (eager: 0 / min) for a layer with sliding_window=W, no cache:
    (B, 1, S, S) bool, True = may attend."""
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, sliding_window=W)
    cfg._attn_implementation = "eager"
    emb = torch.zeros(B, S, 16)
    am = torch.ones(B, S, dtype=torch.long) if attention_mask is None else attention_mask
    m = mu.create_sliding_window_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=am, past_key_values=None,
                                             position_ids=torch.arange(S)[None].expand(B, S))  # fmt: skip
    return m == 0
