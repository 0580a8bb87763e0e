"""My attention layer: Llama attention in plain tensor algebra (projections, RoPE with HF's half-split pairs, GQA by
repeating K/V, the causal and padding masks, a float32 softmax, o_proj).

It has a bug on purpose: the scores are not scaled by 1/sqrt(head_dim). `pytest` here fails at stage `scale` with
the hint "scores look scaled by 8.0x: is the 1/sqrt(head_dim) scale missing?".
"""

import torch


def attention(x, weights, *, config, position_ids, attention_mask=None):
    H, Hkv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    B, S, _ = x.shape
    theta = config["rope_parameters"]["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=x.device).float() / d))
    angles = position_ids[..., None].float() * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def rotate(t):
        a, b = t.float().chunk(2, -1)
        return (t.float() * cos + torch.cat([-b, a], -1) * sin).to(t.dtype)

    def heads(name, n):
        return (x @ weights[name].T).view(B, S, n, d).transpose(1, 2)

    q, k, v = rotate(heads("q_proj", H)), rotate(heads("k_proj", Hkv)), heads("v_proj", Hkv)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    allowed = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    scores = (q @ k.transpose(-2, -1)).float()  # BUG: should be multiplied by d**-0.5
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)  # rows with no key: 0
    return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, S, H * d) @ weights["o_proj"].T
