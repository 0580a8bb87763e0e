"""Rotary position embeddings (RoPE), from a config, as Llama, Qwen, Mistral, Gemma, GPT-OSS and Phi-3 use them.

A pair of channels (a, b) of q and k is rotated by the angle  position * inv_freq[i].  Because the rotation of q
at position m and of k at position n combine into a rotation by (m - n), scores depend only on the distance
between positions: RoPE is relative. A frequency bug therefore shows only at unequal, long distances.

Pairs: HF's checkpoints pair channel i with channel i + rd/2 ("half-split", `apply_half`); Meta's and llama.cpp's
pair 2i with 2i+1 ("interleaved", `apply_interleaved`). The two are the same attention once the q/k weight rows
are permuted accordingly. With partial rotary (rotary_dim = head_dim * partial_rotary_factor < head_dim, Phi-4-mini's
0.75) only the first rotary_dim channels rotate, rotate_half within them, and the rest pass through unchanged.

Per layer type: Gemma 3 keys rope_parameters by layer type ({"full_attention": {...}, "sliding_attention": {...}}: a
base of 1e6 on its global layers, linearly scaled by 8 in the 4B and larger models, and 10000 on its local ones);
`layer_rope` picks the layer's by config["layer_type"], and every function here reads the rope parameters through it.

Scaling (rope_parameters["rope_type"]), with inv_freq_i = theta^(-2i/rd) the default frequencies:
    default  angle = position * inv_freq_i.
    linear   inv_freq_i / factor: positions squeezed by `factor`, so a context `factor` times longer maps onto the
             angles the model was trained on (every frequency slowed alike).
    dynamic  NTK-aware: past max_position_embeddings the base grows to theta * (factor L / max - (factor - 1))^(rd /
             (rd - 2)) for the longest length L seen (transformers recomputes from max(position_ids) + 1); within
             the trained context nothing changes. High frequencies barely move, low ones slow down.
    llama3   wavelengths 2 pi / inv_freq longer than original_max / low_freq_factor are divided by `factor`, those
             shorter than original_max / high_freq_factor kept, a linear ramp in between: only the long-range bands
             are stretched.
    yarn     the same idea with a ramp over pair indices set by beta_fast / beta_slow (interpolate low frequencies,
             extrapolate high ones), and cos/sin multiplied by an attention factor (0.1 ln(factor) + 1 by default)
             that sharpens the softmax back to its trained temperature.
    longrope Phi-3 / Phi-4: one rescale factor per frequency, short_factor while the longest position + 1 is within
             original_max_position_embeddings, long_factor past it (transformers switches on max(position_ids) + 1),
             and cos/sin multiplied by sqrt(1 + ln(factor) / ln(original_max)), factor = max / original_max.

Precision: angles are float32 position * float32 frequency, elementwise (never in bf16: at position 100000
a bf16 angle is off by hundreds of radians). `dtype=torch.float64` gives reference tables.
"""

from __future__ import annotations

import math

import torch


def layer_rope(config: dict) -> dict:
    """The config of this layer with its rope_parameters flat ({"rope_type": ..., "rope_theta": ..., ...}).

    Gemma 3's are keyed by layer type: the layer's are rope_parameters[config["layer_type"]]. Every other family
    has one flat dict, returned as it is (so calling this twice changes nothing).
    """
    rp = config.get("rope_parameters") or {}
    if not any(isinstance(v, dict) for v in rp.values()):
        return config  # flat already
    kind = config.get("layer_type")
    if kind not in rp:
        raise ValueError(
            f"rope_parameters are keyed by layer type ({', '.join(sorted(rp))}): config['layer_type'] must name one "
            f"of them, got {kind!r}"
        )
    return {**config, "rope_parameters": rp[kind]}


def dims(config: dict) -> tuple[int, int]:
    """(head_dim, rotary_dim)."""
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rp = layer_rope(config).get("rope_parameters") or {}
    factor = rp.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return d, int(d * factor)


def inv_freq(config: dict, *, seq_len: int | None = None, dtype=torch.float32) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim/2] and the cos/sin scaling ("attention factor") for the config's rope_type.

    Mirrors transformers' rope init functions operation for operation, so float32 results are bit-identical;
    with dtype=torch.float64 the same formulas give a reference table.
    """
    config = layer_rope(config)
    rp = config["rope_parameters"]
    kind = rp.get("rope_type", "default")
    base = rp["rope_theta"]
    _, dim = dims(config)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim  # (dim/2,)
    scaling = 1.0

    if kind == "default":
        inv = 1.0 / (base**exponent)
    elif kind == "linear":  # positions divided by factor == frequencies divided by factor
        inv = 1.0 / (base**exponent)
        inv = inv / rp["factor"]
    elif kind == "dynamic":  # NTK: a larger base once the sequence outgrows the trained context
        max_pos = config["max_position_embeddings"]
        seq_len = max(seq_len or max_pos, max_pos)
        factor = rp["factor"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base**exponent)
    elif kind == "llama3":
        inv, scaling = _llama3(rp, 1.0 / (base**exponent))
    elif kind == "yarn":
        inv, scaling = _yarn(config, rp, base, dim, exponent)
    elif kind == "longrope":
        inv, scaling = _longrope(config, rp, base, exponent, seq_len)
    else:
        raise ValueError(
            f"rope_type '{kind}' is not implemented here (default, linear, dynamic, llama3, yarn, longrope)"
        )
    return inv, scaling


def _llama3(rp: dict, inv: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Llama 3.1+: long wavelengths slowed down by `factor`, short ones kept, a smooth ramp in between."""
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old_ctx = rp["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)  # long wavelengths: divide by factor
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, out), 1.0


def _yarn(config: dict, rp: dict, base: float, dim: int, exponent: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between; scale cos/sin by mscale."""
    factor = rp.get("factor")
    old_ctx = rp["original_max_position_embeddings"]
    if factor is None:
        factor = config["max_position_embeddings"] / old_ctx

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(exponent.dtype)
    pos_freqs = base**exponent
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention_factor


def _longrope(config: dict, rp: dict, base: float, exponent: torch.Tensor, seq_len) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3, Phi-4-mini): each frequency divided by its own rescale factor, cos/sin scaled.

    The factors are short_factor up to original_max_position_embeddings and long_factor past it (seq_len, the
    longest position + 1, decides: None means short, as transformers' init does); one factor per rotated pair.
    """
    old_ctx = rp.get("original_max_position_embeddings") or config["original_max_position_embeddings"]
    factor = rp.get("factor")
    if factor is None:  # Phi-3 stores the extended context instead: factor = max / original max
        factor = config["max_position_embeddings"] / old_ctx
    scaling = rp.get("attention_factor")
    if scaling is None:  # the paper's suggestion: keep the softmax's temperature as the context grows
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
    factors = rp["long_factor"] if seq_len and seq_len > old_ctx else rp["short_factor"]
    ext = torch.tensor(factors, dtype=exponent.dtype)  # (rd/2,): float32 as transformers has them, or float64
    if ext.shape != exponent.shape:
        raise ValueError(f"longrope factors: {ext.numel()} given, rotary_dim / 2 = {exponent.numel()} needed")
    return 1.0 / (ext * base**exponent), scaling


def cos_sin(
    inv: torch.Tensor, position_ids: torch.Tensor, scaling: float = 1.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, rotary_dim] for any position_ids [B, S], in the half-split layout (angles twice).

    dtype float32: position (float32) * frequency (float32), elementwise, as transformers does.
    dtype float64: the same in float64, a reference table.
    """
    angles = position_ids[..., None].to(dtype) * inv.to(dtype)  # (B, S, rd/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, S, rd)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's convention: channel i rotates with channel i + rd/2. x (B, H, S, d); cos/sin (B, S, rd)."""
    return _partial(x, cos, sin, lambda xr, c, s: xr * c + rotate_half(xr) * s)


def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta's convention: channel 2i rotates with channel 2i+1. Same cos/sin tables as apply_half."""

    def rot(xr, c, s):
        half = c.shape[-1] // 2
        c, s = c[..., :half], s[..., :half]  # one angle per pair
        a, b = xr[..., 0::2], xr[..., 1::2]  # (B, H, S, rd/2) each
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)  # (B, H, S, rd)

    return _partial(x, cos, sin, rot)


def _partial(x, cos, sin, rotate):
    """Rotate the first rotary_dim channels, pass the rest through (partial rotary)."""
    rd = cos.shape[-1]
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, S, rd): broadcast over heads
    if rd == x.shape[-1]:
        return rotate(x, c, s)
    return torch.cat((rotate(x[..., :rd], c, s), x[..., rd:]), dim=-1)
