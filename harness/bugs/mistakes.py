"""The mistakes, as written by someone in a hurry: each a pipeline step (pipeline.py) or a whole kernel or layer
with one thing wrong. The catalog (catalog.py) names them, says which stage each breaks and what to fix.

    projection and heads   split without the transpose, v from k_proj, o_proj transposed
    RoPE                   pairing, sign, what gets rotated, the tables (positions, scaling, theta, precision)
    scores and softmax     GQA mapping, scale, softmax axis and precision, the P @ V accumulator
    masks                  causal diagonal and alignment, padding axis and polarity
    whole kernels          a decode step's position, the scale argument, the lse, backward-only mistakes
"""

from __future__ import annotations

import math

import torch

from harness.bugs import backward, pipeline
from harness.bugs.pipeline import acc, rot, tables
from impl import masks, naive, rope
from impl.decode import KVCache, step
from impl.projection import merge_heads
from impl.tiled import flash_forward


def split_no_transpose(t, n, d):
    B, S, _ = t.shape
    return t.view(B, n, S, d)  # the transpose forgotten: each "head" is a slab of the flat buffer


def project_v_with_k(x, w, name, n, d, split):
    return split(x @ w["k_proj" if name == "v_proj" else name].T, n, d)  # copy-paste: v from k_proj


def rotate_interleaved(q, k, v, cos, sin):  # GPT-J / Meta pairing on HF-ordered (half-split) weights
    return rot(q, cos, sin, rope.apply_interleaved), rot(k, cos, sin, rope.apply_interleaved), v


def rotate_wrong_sign(q, k, v, cos, sin):
    def backwards(x, c, s):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c[:, None] + torch.cat((x2, -x1), dim=-1) * s[:, None]  # cat(x2, -x1) instead of cat(-x2, x1)

    return rot(q, cos, sin, backwards), rot(k, cos, sin, backwards), v


def rotate_q_only(q, k, v, cos, sin):
    return rot(q, cos, sin), k, v


def rotate_v_too(q, k, v, cos, sin):
    return rot(q, cos, sin), rot(k, cos, sin), rot(v, cos, sin)


def tables_arange(config, position_ids, dtype):
    B, S = position_ids.shape
    return tables(config, torch.arange(S).expand(B, S), dtype)  # "positions are just 0..S-1"


def tables_no_llama3(config, position_ids, dtype):
    rp = config["rope_parameters"]
    plain = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": rp["rope_theta"]}}
    return tables(plain, position_ids, dtype)  # theta only: the llama3 rescaling of long wavelengths skipped


def tables_factor8(config, position_ids, dtype):
    rp = config["rope_parameters"]
    if rp.get("rope_type") == "llama3":
        config = {**config, "rope_parameters": {**rp, "factor": 8.0}}  # hard-coded 8, as in Meta's reference code
    return tables(config, position_ids, dtype)


def tables_theta_10000(config, position_ids, dtype):
    rp = config["rope_parameters"]
    return tables({**config, "rope_parameters": {**rp, "rope_theta": 10000.0}}, position_ids, dtype)  # Llama-2's


def tables_rounded(to: torch.dtype):
    def tables_low(config, position_ids, dtype):
        cos, sin = tables(config, position_ids, torch.float32)  # a rotary cache kept in half precision
        return cos.to(to).to(dtype), sin.to(to).to(dtype)

    return tables_low


def tables_params(change):
    """Tables from the config's rope_parameters as `change` rewrites them (a scaling misread)."""

    def t(config, position_ids, dtype):
        rp = change(dict(config["rope_parameters"]))
        return tables({**config, "rope_parameters": rp}, position_ids, dtype)

    return t


def tables_unscaled_cos_sin(config, position_ids, dtype):
    inv, _ = rope.inv_freq(config, seq_len=int(position_ids.max()) + 1, dtype=dtype)
    return rope.cos_sin(inv.to(position_ids.device), position_ids, 1.0, dtype=dtype)  # yarn's mscale dropped


def tables_static_ntk(config, position_ids, dtype):
    """Dynamic NTK applied always, at its full factor ("static NTK"): base * factor^(d / (d - 2)) for every length."""
    rp = config["rope_parameters"]
    d = rope.dims(config)[1]
    plain = {"rope_type": "default", "rope_theta": rp["rope_theta"] * rp["factor"] ** (d / (d - 2))}
    return tables({**config, "rope_parameters": plain}, position_ids, dtype)


def tables_dynamic_every_length(config, position_ids, dtype):
    """Dynamic NTK rescaling the base at every length, from the sequence's length L: base * (factor L / max)^(d /
    (d - 2)) with no floor, so within the context (where the base must stay rope_theta) it shrinks."""
    rp = config["rope_parameters"]
    d = rope.dims(config)[1]
    L = int(position_ids.max()) + 1 if position_ids.numel() else 1
    alpha = rp["factor"] * L / config["max_position_embeddings"]  # should be max(that - (factor - 1), 1)
    plain = {"rope_type": "default", "rope_theta": rp["rope_theta"] * alpha ** (d / (d - 2))}
    return tables({**config, "rope_parameters": plain}, position_ids, dtype)


def default_rope(rp):
    return {"rope_type": "default", "rope_theta": rp["rope_theta"]}


def square_factor(rp):
    return {**rp, "factor": rp["factor"] ** 2}


def swap_betas(rp):
    fast, slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1
    return {**rp, "beta_fast": slow, "beta_slow": fast}


def tables_bf16_angles(config, position_ids, dtype):
    inv, scaling = rope.inv_freq(config)
    ang = position_ids.to(torch.bfloat16)[..., None] * inv.to(torch.bfloat16)  # (B, S, d/2) in bfloat16
    emb = torch.cat((ang, ang), dim=-1).to(dtype)  # (B, S, d)
    return emb.cos() * scaling, emb.sin() * scaling


def expand_tiled(k, g):
    return k.repeat(1, g, 1, 1)  # (B, g*Hkv, S, d): query head h gets KV head h % Hkv, not h // g


def expand_first_head(k, g):
    return k[:, :1].expand(-1, k.shape[1] * g, -1, -1)  # every query head reads KV head 0 (an MQA habit)


def scores_unscaled(q, k, d):
    return (q @ k.transpose(-2, -1)).to(acc(q))


def scores_hidden_scale(q, k, d):
    D = q.shape[1] * d  # hidden_size = H * d
    return (q @ k.transpose(-2, -1)).to(acc(q)) / D**0.5


def scores_over_d(q, k, d):
    return (q @ k.transpose(-2, -1)).to(acc(q)) / d  # 1/d, not 1/sqrt(d)


def aggregate_scaled(probs, v):
    return (probs * v.shape[-1] ** -0.5).to(v.dtype) @ v  # the 1/sqrt(d) landed on the probabilities


def softmax_over_queries(s, allowed):
    s = s.masked_fill(~allowed, float("-inf"))
    e = torch.exp(s - s.amax(dim=-2, keepdim=True).clamp(min=-1e30))
    return e / e.sum(dim=-2, keepdim=True).clamp(min=1e-30)  # dim=-2: normalised over the queries


def softmax_in(to: torch.dtype):
    def softmax_low(s, allowed):
        return masks.masked_softmax(s.to(to), allowed).to(s.dtype)  # "half is enough for probabilities"

    return softmax_low


def aggregate_fp16_accumulator(probs, v, block: int = 16):
    """probabilities @ v with the running sum kept in float16, as a tiled kernel with an fp16 accumulator does:
    each key block's partial product is exact, every addition to the accumulator rounds to float16."""
    out = torch.zeros(*probs.shape[:-1], v.shape[-1], dtype=torch.float16)  # (B, H, Sq, d)
    for j in range(0, v.shape[-2], block):
        part = probs[..., j : j + block].to(v.dtype) @ v[..., j : j + block, :]  # (B, H, Sq, d)
        out = (out.to(part.dtype) + part).half()
    return out.to(v.dtype)


def softmax_torch_half(s, allowed):
    """torch.softmax on half-precision scores (it subtracts the row max itself), masked HF-style with the dtype's
    minimum."""
    s = s.half().masked_fill(~allowed, torch.finfo(torch.float16).min)  # "half is plenty for probabilities"
    return torch.softmax(s, dim=-1).to(torch.float32)


def softmax_half_no_max(s, allowed):
    """The softmax by hand in float16, the row max never subtracted: exp overflows once a score passes 11.09."""
    e = s.half().masked_fill(~allowed, float("-inf")).exp()  # "the scores are small"
    z = e.sum(dim=-1, keepdim=True)
    return (e / torch.where(z > 0, z, torch.ones_like(z))).to(torch.float32)


def softmax_exp_bf16(s, allowed):
    """The max subtracted in float32, then exp in bfloat16 (a "fast exp"), normalised in float32."""
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp((s - m).to(torch.bfloat16)).to(s.dtype)
    return e / e.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def aggregate_in(to: torch.dtype):
    def aggregate_low(probs, v):
        return (probs.to(to) @ v.to(to)).to(v.dtype)  # "the matmul is faster in half"

    return aggregate_low


def softmax_nan_rows(s, allowed):
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)  # an all -inf row -> NaN


def softmax_no_max(s, allowed):
    e = torch.exp(s) * allowed  # the max is never subtracted: exp overflows once scores reach ~89 (float32)
    return e / e.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def allowed_no_causal(Sq, Sk, attention_mask, causal=True):
    m = torch.ones(1, 1, Sq, Sk, dtype=torch.bool)  # the causal part never built
    return m & masks.padding(attention_mask) if attention_mask is not None else m


def _tril(Sq, Sk, attention_mask, causal, diagonal):
    m = torch.ones(Sq, Sk, dtype=torch.bool)
    m = (m.tril(diagonal) if causal else m)[None, None]  # tril: top-left aligned, as written for Sq == Sk
    return m & masks.padding(attention_mask) if attention_mask is not None else m


def allowed_strict(Sq, Sk, attention_mask, causal=True):
    return _tril(Sq, Sk, attention_mask, causal, -1)  # tril(-1): each token hidden from itself


def allowed_sees_next(Sq, Sk, attention_mask, causal=True):
    return _tril(Sq, Sk, attention_mask, causal, 1)  # tril(1): one future token visible


def allowed_top_left(Sq, Sk, attention_mask, causal=True):
    return _tril(Sq, Sk, attention_mask, causal, 0)  # right for Sq == Sk; with a cache, query i sees only 0..i


def allowed_always_causal(Sq, Sk, attention_mask, causal=True):
    return masks.build(Sq, Sk, attention_mask)  # the causal flag never read


def allowed_no_padding(Sq, Sk, attention_mask, causal=True):
    return masks.build(Sq, Sk, None, is_causal=causal)  # attention_mask never used


def allowed_padding_inverted(Sq, Sk, attention_mask, causal=True):
    m = masks.build(Sq, Sk, None, is_causal=causal)
    return m & (attention_mask == 0)[:, None, None, :] if attention_mask is not None else m  # 1 read as "masked"


def allowed_padding_on_queries(Sq, Sk, attention_mask, causal=True):
    m = masks.build(Sq, Sk, None, is_causal=causal)  # the padding mask broadcast over the query axis, not keys
    return m & attention_mask.bool()[:, None, :Sq, None] if attention_mask is not None else m


def output_transposed(ctx, w):
    return merge_heads(ctx) @ w["o_proj"]  # nn.Linear stores [out, in]: this needs .T


def decode_wrong_position(x, w, *, config, position_ids, attention_mask=None):
    """Prefill all but the last token, then decode it with the KV cache, at position = tokens in the cache."""
    S = x.shape[1]
    cache = KVCache()
    first = []
    if S > 1:
        first = [step(naive.core, x[:, :-1], w, config=config, position_ids=position_ids[:, :-1], cache=cache,
                      attention_mask=None if attention_mask is None else attention_mask[:, :-1])]  # fmt: skip
    pos = torch.full_like(position_ids[:, -1:], cache.length())  # should be position_ids[:, -1:]
    last = step(naive.core, x[:, -1:], w, config=config, position_ids=pos, cache=cache, attention_mask=attention_mask)
    return torch.cat(first + [last], dim=1)


def scale_arg_ignored(q, k, v, *, causal=True, scale=None, attention_mask=None):
    return pipeline.core()(q, k, v, causal=causal, attention_mask=attention_mask)  # always 1/sqrt(d)


def lse_wrong(how):
    def attn(q, k, v, *, causal=True, scale=None, attention_mask=None):
        out, lse = flash_forward(q, k, v, attention_mask, causal=causal, scale=scale)
        if how == "base2":
            return out, lse / math.log(2)  # log2 of the row sum: exp2-based kernels keep lse in base 2
        s = (q.float() @ k.float().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-2, -1))  # unscaled
        keep = masks.build(q.shape[2], k.shape[2], attention_mask, q.device, is_causal=causal)
        return out, torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)

    return attn


def rotate_backward_forward(q, k, v, cos, sin):
    def rotated(x):
        return backward.Rotate.apply(x.to(cos.dtype), cos, sin, "forward_rotation").to(x.dtype)

    return rotated(q), rotated(k), v


def output_backward_transposed(ctx, w):
    return backward.Linear.apply(merge_heads(ctx), w["o_proj"], "input_transposed")


def project_backward_unsummed(x, w, name, n, d, split):
    return split(backward.Linear.apply(x, w[name], "weight_unsummed" if name == "q_proj" else None), n, d)
