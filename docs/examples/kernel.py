"""A kernel verified through the core contract (the attention between the projections and o_proj):

    attention-verify verify --core docs/examples/kernel.py:attn

Here PyTorch's SDPA with the contract's conventions made explicit: GQA without repeating K/V, the causal mask
bottom-right aligned (a query block at the end of the keys, as with a KV cache), padded keys masked, and the
log-sum-exp returned so the harness checks it too. Swap the body for your Triton or CUDA kernel.
"""

import torch
import torch.nn.functional as F


def attn(q, k, v, *, causal=True, scale=None, attention_mask=None):
    """q [B, H, Sq, d]; k, v [B, Hkv, Sk, d] -> (out [B, H, Sq, d], lse [B, H, Sq] float32)."""
    Sq, Sk, d = q.shape[2], k.shape[2], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:  # query i is key Sk - Sq + i
        keep = keep.tril(Sk - Sq)
    keep = keep[None, None]
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)
    seen = keep.any(-1, keepdim=True)  # (B|1, 1, Sq, 1)
    out = torch.where(seen, out, 0.0)  # a row that sees no key: 0, not NaN
    g = q.shape[1] // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    lse = torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)  # -inf where no key
    return out.to(q.dtype), lse
