"""A kernel verified through the core contract (the attention between the projections and o_proj):

    attention-verify verify --core docs/examples/kernel.py:attn

Here PyTorch's SDPA with the contract's conventions made explicit: GQA without repeating K/V, the causal mask
bottom-right aligned (a query block at the end of the keys, as with a KV cache), padded keys masked, a sliding
window as FlashAttention's window_size, and the log-sum-exp returned so the harness checks it too. SDPA cannot cap
scores or add sinks: with softcap or sinks the scores are taken explicitly. Swap the body for your Triton or CUDA
kernel; a keyword left out of the signature skips the scenarios that use it (reported, never a pass).
"""

import torch
import torch.nn.functional as F


def attn(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None):
    """q [B, H, Sq, d]; k, v [B, Hkv, Sk, d]; window (left, right), -1/None unbounded; sinks [H] float32
    -> (out [B, H, Sq, d], lse [B, H, Sq] float32: the log of the softmax's whole denominator, sinks included)."""
    Sq, Sk, d = q.shape[2], k.shape[2], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    p = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)  # query i is key Sk - Sq + i (bottom-right)
    j = torch.arange(Sk, device=q.device)[None, :]
    keep = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= p
    left, right = window if window is not None else (None, None)
    if left is not None and left >= 0:
        keep &= j >= p - left
    if right is not None and right >= 0:
        keep &= j <= p + right
    keep = keep[None, None]  # (1, 1, Sq, Sk)
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]  # (B, 1, Sq, Sk)
    g = q.shape[1] // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:  # one more logit per head in the denominator, with no value
        sink = sinks.float()[None, :, None, None].expand(*s.shape[:3], 1)  # (B, H, Sq, 1)
        s = torch.cat([s, sink], dim=-1)  # (B, H, Sq, Sk + 1)
    lse = torch.logsumexp(s, dim=-1)  # -inf where no key (and no sink)
    if softcap or sinks is not None:
        probs = torch.exp(s - lse[..., None]).nan_to_num(0.0)[..., :Sk]  # (B, H, Sq, Sk): the sink's share dropped
        out = probs @ v.float().repeat_interleave(g, 1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)
        out = torch.where(keep.any(-1, keepdim=True), out, 0.0)  # a row that sees no key: 0, not NaN
    return out.to(q.dtype), lse
