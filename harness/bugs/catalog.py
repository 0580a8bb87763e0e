"""The catalog of attention bugs: one entry per bug, each the textbook pipeline (pipeline.py) with one step written
the way people actually get it wrong.

An entry is the single source for everything that knows the bug: the mutation suite runs it (mutants.py), the
tests pick it by name, and, unless it is held out, the diagnosis uses it as a suspect (its steps re-run in float64
on the failing inputs; a match names `stage` with `hint`). Held-out entries are never seen by the diagnosis: the
mutation suite scores them apart, so its held-out figure measures how the diagnosis does on bugs it was not
written for.

Hints may use {d}, {D}, {sqrt_d}, {inv_sqrt_d}, {inv_sqrt_D}, {factor}, {theta} (from the fixture's config).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from harness.bugs import backward, pipeline
from harness.bugs.pipeline import _rot, acc, layer, tables
from impl import masks, rope
from impl.decode import KVCache, step
from impl.gqa import repeat_kv
from impl.projection import merge_heads

STAGES = (
    "projection",
    "head_layout",
    "gqa",
    "rope",
    "rope_frequencies",
    "rope_precision",
    "scale",
    "causal_mask",
    "padding_mask",
    "softmax",
    "softmax_precision",
    "accumulation_precision",
    "tiling",
    "lse",
    "output_projection",
    "nonfinite",
    "unknown",
    # the backward pass (verify --grad)
    "grad_softmax",
    "grad_scale",
    "grad_mask",
    "grad_gqa",
    "grad_rope",
    "grad_projection",
    "grad_nonfinite",
    "grad_unknown",
)


def always(config: dict) -> bool:
    return True


def grouped(config: dict) -> bool:
    """The query-to-KV-head mapping only shows with 1 < Hkv < H."""
    return 1 < config["num_key_value_heads"] < config["num_attention_heads"]


def llama3(config: dict) -> bool:
    return config["rope_parameters"].get("rope_type") == "llama3"


def square_o(config: dict) -> bool:
    """o_proj transposed only has the right shape when hidden_size == H * head_dim."""
    H = config["num_attention_heads"]
    return config["hidden_size"] == H * (config.get("head_dim") or config["hidden_size"] // H)


@dataclass(frozen=True)
class Bug:
    name: str
    stage: str  # the stage the diagnosis should name (STAGES)
    bug: str  # the mistake, in one line
    hint: str  # what to fix, in the user's terms (said when the diagnosis matches this entry as a suspect)
    steps: dict = field(default_factory=dict)  # pipeline steps it replaces
    fn: Callable | None = field(default=None, repr=False)  # a whole layer instead (bugs outside the pipeline)
    held_out: bool = False  # never used by the diagnosis
    shows: Callable[[dict], bool] = field(default=always, repr=False)  # configs on which the bug can show at all
    contract: str = "layer"  # the contract the mutation suite runs it through: "layer" or "core" (a kernel)
    kind: str = "forward"  # "backward": the forward is right, the gradients are not (caught by verify --grad)

    def layer(self) -> Callable:
        """The bug as a plug-in of the layer contract."""
        return self.fn or layer(**self.steps)

    def kernel(self) -> Callable | None:
        """The bug as a kernel of the core contract, when it lives between the projections and o_proj."""
        if self.contract == "core" and self.fn is not None:
            return self.fn
        return pipeline.core(**self.steps) if self.steps and set(self.steps) <= pipeline.KERNEL_STEPS else None

    def hint_for(self, config: dict) -> str:
        d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        D, rp = config["hidden_size"], config["rope_parameters"]
        return self.hint.format(d=d, D=D, sqrt_d=math.sqrt(d), inv_sqrt_d=d**-0.5, inv_sqrt_D=D**-0.5,
                                factor=rp.get("factor", 1.0), theta=rp.get("rope_theta"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# the mistakes, as written by someone in a hurry


def split_no_transpose(t, n, d):
    B, S, _ = t.shape
    return t.view(B, n, S, d)  # the transpose forgotten: each "head" is a slab of the flat buffer


def project_v_with_k(x, w, name, n, d, split):
    return split(x @ w["k_proj" if name == "v_proj" else name].T, n, d)  # copy-paste: v from k_proj


def rotate_interleaved(q, k, v, cos, sin):  # GPT-J / Meta pairing on HF-ordered (half-split) weights
    return _rot(q, cos, sin, rope.apply_interleaved), _rot(k, cos, sin, rope.apply_interleaved), v


def rotate_wrong_sign(q, k, v, cos, sin):
    def backwards(x, c, s):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c[:, None] + torch.cat((x2, -x1), dim=-1) * s[:, None]  # cat(x2, -x1) instead of cat(-x2, x1)

    return _rot(q, cos, sin, backwards), _rot(k, cos, sin, backwards), v


def rotate_q_only(q, k, v, cos, sin):
    return _rot(q, cos, sin), k, v


def rotate_v_too(q, k, v, cos, sin):
    return _rot(q, cos, sin), _rot(k, cos, sin), _rot(v, cos, sin)


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


def rope_type(kind: str):
    return lambda config: config["rope_parameters"].get("rope_type") == kind


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


def _default_rope(rp):
    return {"rope_type": "default", "rope_theta": rp["rope_theta"]}


def _square_factor(rp):
    return {**rp, "factor": rp["factor"] ** 2}


def _swap_betas(rp):
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


def flash(q, k, v, attention_mask=None, causal=True, scale=None, *, bug: str, block: int = 128):
    """A FlashAttention-2 forward (square blocks, causal, Sq == Sk as written) with one of its classic bugs."""
    B, H, S, d = q.shape
    g = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    k, v = repeat_kv(k, g), repeat_kv(v, g)  # (B, H, S, d)
    f = acc(q)
    keep = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, S)
    out = torch.zeros_like(q, dtype=f)  # (B, H, S, d)
    n = S // block if bug == "drop_last_block" else -(-S // block)  # floor division loses the partial block
    for bi in range(n):
        i0, i1 = bi * block, min((bi + 1) * block, S)
        m = torch.full((B, H, i1 - i0, 1), float("-inf"), dtype=f)
        l = torch.zeros(B, H, i1 - i0, 1, dtype=f)
        o = torch.zeros(B, H, i1 - i0, d, dtype=f)
        for bj in range(bi + 1 if causal else n):  # causal: key blocks up to the diagonal
            j0, j1 = bj * block, min((bj + 1) * block, S)
            s = (q[:, :, i0:i1] @ k[:, :, j0:j1].transpose(-2, -1)).to(f) * scale  # (B, H, bq, bk)
            if causal and bj == bi:
                i = torch.arange(i0, i1)[:, None]
                j = torch.arange(j0, j1)[None, :]
                future = (j - j0 > i) if bug == "diag_mask" else (j > i)  # local key index vs global query index
                s = s.masked_fill(future, float("-inf"))
            if keep is not None:
                s = s.masked_fill(~keep[..., j0:j1], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - safe)
            alpha = torch.exp(m - safe)
            l = l * alpha + p.sum(-1, keepdim=True)
            o = (o if bug == "no_rescale" else o * alpha) + p @ v[:, :, j0:j1].to(f)  # eq. 6 forgotten
            m = m_new
        out[:, :, i0:i1] = o / torch.where(l > 0, l, torch.ones_like(l))
    return out.to(q.dtype)


def decode_wrong_position(x, w, *, config, position_ids, attention_mask=None):
    """Prefill all but the last token, then decode it with the KV cache, at position = tokens in the cache."""
    from impl.naive import core

    S = x.shape[1]
    cache = KVCache()
    first = []
    if S > 1:
        first = [step(core, x[:, :-1], w, config=config, position_ids=position_ids[:, :-1], cache=cache,
                      attention_mask=None if attention_mask is None else attention_mask[:, :-1])]  # fmt: skip
    pos = torch.full_like(position_ids[:, -1:], cache.length())  # should be position_ids[:, -1:]
    last = step(core, x[:, -1:], w, config=config, position_ids=pos, cache=cache, attention_mask=attention_mask)
    return torch.cat(first + [last], dim=1)


def scale_arg_ignored(q, k, v, *, causal=True, scale=None, attention_mask=None):
    return pipeline.core()(q, k, v, causal=causal, attention_mask=attention_mask)  # always 1/sqrt(d)


def _lse_wrong(how):
    def attn(q, k, v, *, causal=True, scale=None, attention_mask=None):
        from impl.tiled import flash_forward

        out, lse = flash_forward(q, k, v, attention_mask, causal=causal, scale=scale)
        if how == "base2":
            return out, lse / math.log(2)  # log2 of the row sum: exp2-based kernels keep lse in base 2
        s = (q.float() @ k.float().repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-2, -1))  # unscaled
        keep = masks.build(q.shape[2], k.shape[2], attention_mask, q.device, is_causal=causal)
        return out, torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=-1)

    return attn


def _tiled(bug):
    return lambda q, k, v, m, causal, scale: flash(q, k, v, m, causal, scale, bug=bug)


def rotate_backward_forward(q, k, v, cos, sin):
    def rot(x):
        return backward.Rotate.apply(x.to(cos.dtype), cos, sin, "forward_rotation").to(x.dtype)

    return rot(q), rot(k), v


def output_backward_transposed(ctx, w):
    return backward.Linear.apply(merge_heads(ctx), w["o_proj"], "input_transposed")


def project_backward_unsummed(x, w, name, n, d, split):
    return split(backward.Linear.apply(x, w[name], "weight_unsummed" if name == "q_proj" else None), n, d)


def _grad(bug: str, stage: str, what: str, hint: str, **kw) -> Bug:
    return Bug(f"grad_{bug}", stage, what, hint, fn=backward.kernel(bug), contract="core", kind="backward", **kw)


# ---------------------------------------------------------------------------------------------------------
# the catalog

HELD = {"held_out": True}

CATALOG: list[Bug] = [
    # scale
    Bug("scale_missing", "scale", "scores not divided by sqrt(head_dim)",
        "scores look scaled by {sqrt_d:.1f}x: is the 1/sqrt(head_dim) scale missing?", {"scores": scores_unscaled}),
    Bug("scale_after_softmax", "scale", "the 1/sqrt(d) scale applied to the probabilities",
        "the 1/sqrt(head_dim) scale looks applied after the softmax: scale the scores before it",
        {"scores": scores_unscaled, "aggregate": aggregate_scaled}),
    Bug("scale_hidden_size", "scale", "scores divided by sqrt(hidden_size), not sqrt(head_dim)",
        "scale by 1/sqrt(head_dim)", {"scores": scores_hidden_scale}, **HELD),
    Bug("scale_over_d", "scale", "scores divided by head_dim, not its square root",
        "scale by 1/sqrt(head_dim)", {"scores": scores_over_d}, **HELD),
    # softmax
    Bug("softmax_wrong_dim", "softmax", "softmax over dim=-2 (the queries)",
        "the softmax looks normalised over the queries (dim=-2): normalise over the keys (dim=-1)",
        {"softmax": softmax_over_queries}),
    Bug("softmax_low_precision", "softmax_precision", "scores cast to float16 for the softmax",
        "the softmax looks computed in float16: compute it (max, exp, sum) in float32",
        {"softmax": softmax_in(torch.float16)}),
    Bug("softmax_bf16", "softmax_precision", "softmax computed in bfloat16",
        "compute the softmax in float32", {"softmax": softmax_in(torch.bfloat16)}, **HELD),
    Bug("softmax_no_max", "softmax", "exp(scores) without subtracting the row max",
        "subtract the row max before exp", {"softmax": softmax_no_max}, **HELD),
    Bug("masked_rows_nan", "nonfinite", "torch.softmax over an all -inf row gives NaN",
        "a fully masked row must give zeros, not a softmax over all -inf", {"softmax": softmax_nan_rows}),
    # masks
    Bug("causal_missing", "causal_mask", "no causal mask",
        "tokens attend to later tokens: the causal mask is missing", {"allowed": allowed_no_causal}),
    Bug("causal_excludes_self", "causal_mask", "tril(-1): a token cannot see itself",
        "the causal mask hides each token from itself (triu(0) instead of triu(1)): the diagonal must be visible",
        {"allowed": allowed_strict}),
    Bug("causal_sees_next", "causal_mask", "tril(1): each token sees the next one",
        "the causal mask lets each token see the next one", {"allowed": allowed_sees_next}, **HELD),
    Bug("padding_ignored", "padding_mask", "attention_mask never applied",
        "padded keys are attended to: apply attention_mask (1 = token, 0 = padding) to the keys",
        {"allowed": allowed_no_padding}),
    Bug("padding_inverted", "padding_mask", "attention_mask read as 1 = masked",
        "attention_mask looks inverted: 1 = token, 0 = padding", {"allowed": allowed_padding_inverted}, **HELD),
    Bug("padding_on_queries", "padding_mask", "attention_mask applied to the query axis instead of the key axis",
        "mask the keys, [B, 1, 1, S]", {"allowed": allowed_padding_on_queries}, **HELD),
    # heads and GQA
    Bug("gqa_repeat", "gqa", "K/V heads expanded with repeat (tiling), not repeat_interleave",
        "query heads look mapped to KV heads with `repeat` (h % Hkv) instead of `repeat_interleave` "
        "(KV head j serves query heads j*g..j*g+g-1)", {"expand": expand_tiled}, shows=grouped),
    Bug("gqa_first_kv_head", "gqa", "every query head reads KV head 0",
        "expand K/V with repeat_interleave", {"expand": expand_first_head}, shows=grouped, **HELD),
    Bug("head_split_no_transpose", "head_layout", "view(B, H, S, d) without the transpose",
        "heads look split without the transpose: view(B, S, H, d).transpose(1, 2), not view(B, H, S, d)",
        {"split": split_no_transpose}),
    Bug("v_from_k_proj", "projection", "v computed with k_proj's weights (copy-paste)",
        "v = x @ v_proj.T", {"project": project_v_with_k}, **HELD),
    Bug("o_proj_transposed", "output_projection", "ctx @ o_proj instead of ctx @ o_proj.T",
        "the output projection looks transposed: use context @ o_proj.T (nn.Linear layout [out, in])",
        {"output": output_transposed}, shows=square_o),
    # RoPE
    Bug("rope_interleaved", "rope", "interleaved RoPE pairs on HF-ordered weights",
        "RoPE pairs look interleaved (2i, 2i+1) on HF-ordered weights: HF checkpoints pair channel i with i + d/2 "
        "(rotate_half)", {"rotate": rotate_interleaved}),
    Bug("rope_q_only", "rope", "RoPE applied to q only", "only q looks rotated: apply RoPE to k as well",
        {"rotate": rotate_q_only}),
    Bug("rope_wrong_sign", "rope", "rotate_half as cat(x2, -x1)", "rotate_half must be cat(-x2, x1)",
        {"rotate": rotate_wrong_sign}, **HELD),
    Bug("rope_on_v", "rope", "RoPE applied to v as well", "RoPE applies to q and k only",
        {"rotate": rotate_v_too}, **HELD),
    Bug("positions_ignored", "rope", "arange(S) instead of position_ids",
        "rotate by the given position_ids", {"tables": tables_arange}, **HELD),
    Bug("decode_wrong_position", "rope", "the decoded token placed at position len(cache), not position_ids",
        "the decoded token's position", fn=decode_wrong_position),
    Bug("llama3_missing", "rope_frequencies", "llama3 frequency scaling skipped",
        "frequencies look unscaled: the llama3 RoPE scaling (factor {factor:g}) is missing",
        {"tables": tables_no_llama3}, shows=llama3),
    Bug("llama3_factor_8", "rope_frequencies", "llama3 scaling with factor 8 (Meta's hard-coded value), not 32",
        "take rope_parameters from the config", {"tables": tables_factor8}, shows=llama3, **HELD),
    Bug("rope_theta_10000", "rope_frequencies", "rope_theta hard-coded to 10000 (Llama 2's)",
        "take rope_theta from the config", {"tables": tables_theta_10000},
        shows=lambda c: c["rope_parameters"]["rope_theta"] != 10000.0, **HELD),
    # RoPE scaling (the synthetic rope-linear, rope-dynamic and rope-yarn fixtures; llama3 above)
    Bug("linear_scaling_missing", "rope_frequencies", "linear scaling skipped: positions not divided by the factor",
        "frequencies look unscaled: the linear RoPE scaling (positions / factor {factor:g}) is missing",
        {"tables": tables_params(_default_rope)}, shows=rope_type("linear")),
    Bug("linear_factor_squared", "rope_frequencies", "linear scaling applied twice (factor squared)",
        "divide the positions by the factor once", {"tables": tables_params(_square_factor)},
        shows=rope_type("linear"), **HELD),
    Bug("dynamic_always", "rope_frequencies", "dynamic NTK scaling applied at every length (static NTK)",
        "the rotary base looks scaled at every length: dynamic scaling changes it only past max_position_embeddings, "
        "from the longest position seen", {"tables": tables_static_ntk}, shows=rope_type("dynamic")),
    Bug("dynamic_never", "rope_frequencies", "dynamic scaling never applied", "rescale past the trained context",
        {"tables": tables_params(_default_rope)}, shows=rope_type("dynamic"), **HELD),
    Bug("yarn_attention_factor_missing", "rope_frequencies", "yarn's attention factor (mscale on cos/sin) left out",
        "cos/sin look unscaled: yarn multiplies them by its attention factor (0.1 ln(factor) + 1 by default)",
        {"tables": tables_unscaled_cos_sin}, shows=rope_type("yarn")),
    Bug("yarn_betas_swapped", "rope_frequencies", "yarn's beta_fast and beta_slow swapped",
        "beta_fast bounds the high-frequency band", {"tables": tables_params(_swap_betas)}, shows=rope_type("yarn"),
        **HELD),
    Bug("angles_bf16", "rope_precision", "position * inv_freq computed in bfloat16",
        "RoPE angles look computed in bfloat16: compute position * inv_freq in float32",
        {"tables": tables_bf16_angles}),
    Bug("rope_table_bf16", "rope_precision", "the cos/sin cache kept in bfloat16 (gpt-fast's default)",
        "the RoPE cos/sin table looks stored in bfloat16: keep it in float32",
        {"tables": tables_rounded(torch.bfloat16)}),
    Bug("rope_table_fp16", "rope_precision", "the cos/sin cache kept in float16",
        "keep the cos/sin table in float32", {"tables": tables_rounded(torch.float16)}, **HELD),
    Bug("pv_fp16_accumulator", "accumulation_precision", "probabilities @ values accumulated in float16",
        "the probabilities-times-values sum looks accumulated in float16: accumulate in float32",
        {"aggregate": aggregate_fp16_accumulator}),
    # o_proj and the tiled loop
    Bug("tiled_no_rescale", "tiling", "accumulator not rescaled when the running max grows",
        "rescale the accumulator by exp(m - m') when the running max changes", {"core": _tiled("no_rescale")},
        **HELD),
    Bug("tiled_drops_last_block", "tiling", "S // block blocks: the last partial block dropped",
        "loop over ceil(S / block) blocks", {"core": _tiled("drop_last_block")}),
    Bug("tiled_diagonal_mask", "tiling", "diagonal tile masked with the tile-local key index",
        "mask the diagonal tile with global indices", {"core": _tiled("diag_mask")}, **HELD),
    # kernels (the core contract): what only shows with Sq < Sk, a flag or the lse
    Bug("causal_top_left", "causal_mask", "causal mask tril() aligned top-left: wrong with a KV cache (Sq < Sk)",
        "the causal mask looks aligned top-left: with Sq < Sk queries are the last Sq of the Sk keys, so query i "
        "sees keys 0 .. Sk - Sq + i (bottom-right)", {"allowed": allowed_top_left}, contract="core"),
    Bug("causal_flag_ignored", "causal_mask", "the causal=False flag ignored: always causal",
        "honour causal=False", {"allowed": allowed_always_causal}, contract="core", **HELD),
    Bug("scale_arg_ignored", "scale", "the scale argument ignored: always 1/sqrt(d)",
        "use the given scale", fn=scale_arg_ignored, contract="core", **HELD),
    Bug("lse_base2", "lse", "lse returned in base 2 (log2 of the row sum)",
        "lse looks like a base-2 logarithm: return the natural log, lse = m + log(l)", fn=_lse_wrong("base2"),
        contract="core"),
    Bug("lse_unscaled", "lse", "lse of the unscaled scores", "compute lse from the scaled scores",
        fn=_lse_wrong("unscaled"), contract="core", **HELD),
    # the backward pass: a right forward, one mistake in the gradients (verify --grad)
    _grad("no_D", "grad_softmax", "dS = P * dP: the D = rowsum(dO * O) term missing",
          "the softmax backward looks like dS = P * dP: subtract D = rowsum(dO * O), dS = P * (dP - D)"),
    _grad("scale_missing", "grad_scale", "dQ and dK without the 1/sqrt(d) scale",
          "dQ and dK look missing the softmax scale: dQ = scale dS K, dK = scale dS^T Q"),
    _grad("scale_twice", "grad_scale", "dQ and dK scaled twice", "scale dQ and dK once", **HELD),
    _grad("causal_dropped", "grad_mask", "P recomputed in the backward without the causal mask",
          "the backward looks unmasked: recompute P with the forward's causal mask (future keys get 0)"),
    _grad("padding_dropped", "grad_mask", "P recomputed in the backward without the padding mask",
          "mask padded keys in the backward too", **HELD),
    _grad("gqa_first", "grad_gqa", "dK/dV of a KV head taken from the first query head of its group only",
          "a KV head's dK and dV look taken from one of its query heads: sum over all g of them"),
    _grad("gqa_mean", "grad_gqa", "dK/dV of a KV head averaged over its query heads", "sum, not average", **HELD),
    _grad("nan_rows", "grad_nonfinite", "rows with no key give exp(-inf - -inf) = NaN in the backward",
          "rows that see no key (lse = -inf) must give P = 0 in the backward, not NaN"),
    Bug("grad_rope_forward_rotation", "grad_rope", "RoPE's backward rotates by +angle (the forward rotation)",
        "RoPE's backward looks like the forward rotation: the gradient goes back through the inverse (sin negated)",
        {"rotate": rotate_backward_forward}, kind="backward"),
    Bug("grad_o_proj_input_transposed", "grad_projection", "o_proj's backward: grad_input = grad_out @ W.T",
        "the output projection's input gradient looks transposed: grad_ctx = grad_out @ o_proj (not .T)",
        {"output": output_backward_transposed}, kind="backward", shows=square_o),
    Bug("grad_q_proj_first_sequence", "grad_projection", "q_proj's weight gradient from the first sequence only",
        "sum the weight gradient over the batch", {"project": project_backward_unsummed}, kind="backward", **HELD),
]  # fmt: skip

BY_NAME = {b.name: b for b in CATALOG}


def suspects(config: dict) -> list[Bug]:
    """The entries the diagnosis may match on a layer: not held out, pipeline steps, able to show here."""
    return [b for b in CATALOG if not b.held_out and b.kind == "forward" and b.contract == "layer" and b.steps
            and b.shows(config)]  # fmt: skip


def kernel_suspects() -> list[Bug]:
    """The entries the diagnosis may match on a kernel: not held out, expressible as a kernel."""
    return [b for b in CATALOG if not b.held_out and b.kind == "forward" and b.kernel() is not None]


def grad_suspects(contract: str, config: dict | None = None) -> list[Bug]:
    """The backward entries the gradient diagnosis may match: not held out, for this contract."""
    return [b for b in CATALOG if not b.held_out and b.kind == "backward" and b.contract == contract
            and (config is None or b.shows(config))]  # fmt: skip


def pick(name: str) -> Bug:
    return BY_NAME[name]

