"""The catalog of attention bugs: one entry per bug, each the textbook pipeline (pipeline.py) with one step written
the way people actually get it wrong (the steps: mistakes.py; the tiled loop's bugs: tiled.py).

An entry is the single source for everything that knows the bug: the mutation suite runs it (harness/mutants.py), the
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

from harness.bugs import backward, pipeline, ring_catalog
from harness.bugs import family_mistakes as fm
from harness.bugs import keywords as kw
from harness.bugs import mistakes as m
from harness.bugs import serving as sv
from harness.bugs import serving_mistakes as sm
from harness.bugs.pipeline import layer
from harness.bugs.tiled import core_step
from harness.reference.family import FULL, SLIDING, family


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
    stage: str  # the stage the diagnosis should name (harness/stages.py)
    bug: str  # the mistake, in one line
    hint: str  # what to fix, in the user's terms (said when the diagnosis matches this entry as a suspect)
    steps: dict = field(default_factory=dict)  # pipeline steps it replaces
    fn: Callable | None = field(default=None, repr=False)  # a whole layer instead (bugs outside the pipeline)
    held_out: bool = False  # never used by the diagnosis
    shows: Callable[[dict], bool] = field(default=always, repr=False)  # configs on which the bug can show at all
    contract: str = "layer"  # the contract it runs through: "layer", "core", "paged", "varlen", "ring"
    kind: str = "forward"  # "backward": the forward is right, the gradients are not (caught by verify --grad)

    def layer(self) -> Callable:
        """The bug as a plug-in of the layer contract."""
        return self.fn or layer(**self.steps)

    def kernel(self) -> Callable | None:
        """The bug as a kernel of the core contract, when it lives between the projections and o_proj."""
        if self.contract in ("core", "paged", "varlen", "ring") and self.fn is not None:
            return self.fn
        return pipeline.core(**self.steps) if self.steps and set(self.steps) <= pipeline.KERNEL_STEPS else None

    def hint_for(self, config: dict) -> str:
        d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        D, rp = config["hidden_size"], config["rope_parameters"]
        return self.hint.format(d=d, D=D, sqrt_d=math.sqrt(d), inv_sqrt_d=d**-0.5, inv_sqrt_D=D**-0.5,
                                factor=rp.get("factor", 1.0), theta=rp.get("rope_theta"))  # fmt: skip


def qk_norm(config: dict) -> bool:
    return family(config).qk_norm


def plus_one(config: dict) -> bool:
    return family(config).norm_plus_one


def biased(config: dict) -> bool:
    """q/k/v biases: Qwen2 always, the others where attention_bias is set."""
    f = family(config)
    return f.biases == "qkv" or (f.biases == "config" and bool(config.get("attention_bias")))


def o_biased(config: dict) -> bool:
    return family(config).biases == "config" and bool(config.get("attention_bias"))


def pre_attn_scalar(config: dict) -> bool:
    """query_pre_attn_scalar unequal to head_dim (Gemma-2-27B's 144 with head_dim 128)."""
    q = config.get("query_pre_attn_scalar")
    return bool(q) and q != (config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def capped(config: dict) -> bool:
    return bool(config.get("attn_logit_softcapping"))


def sinks(config: dict) -> bool:
    return family(config).sinks


def sliding(config: dict) -> bool:
    return bool(config.get("sliding_window")) and config.get("layer_type") == SLIDING


def full_beside_sliding(config: dict) -> bool:
    """A full-attention layer of a model that also has sliding ones."""
    return bool(config.get("sliding_window")) and config.get("layer_type") == FULL


def partial(config: dict) -> bool:
    rp = config.get("rope_parameters") or {}
    return rp.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) < 1.0


def local_rope(config: dict) -> bool:
    """A sliding layer whose rope parameters differ from the full layers' (Gemma 3: base 10000 against 1e6)."""
    rp = config.get("rope_parameters") or {}
    return config.get("layer_type") == SLIDING and isinstance(rp.get(SLIDING), dict) and rp.get(SLIDING) != rp.get(
        FULL)


def rope_type(kind: str):
    return lambda config: config["rope_parameters"].get("rope_type") == kind


def _grad(bug: str, stage: str, what: str, hint: str, **kw) -> Bug:
    return Bug(f"grad_{bug}", stage, what, hint, fn=backward.kernel(bug), contract="core", kind="backward", **kw)


# ---------------------------------------------------------------------------------------------------------
# the catalog

HELD = {"held_out": True}

CATALOG: list[Bug] = [
    # scale
    Bug("scale_missing", "scale", "scores not divided by sqrt(head_dim)",
        "scores look scaled by {sqrt_d:.1f}x: is the 1/sqrt(head_dim) scale missing?", {"scores": m.scores_unscaled}),
    Bug("scale_after_softmax", "scale", "the 1/sqrt(d) scale applied to the probabilities",
        "the 1/sqrt(head_dim) scale looks applied after the softmax: scale the scores before it",
        {"scores": m.scores_unscaled, "aggregate": m.aggregate_scaled}),
    Bug("scale_hidden_size", "scale", "scores divided by sqrt(hidden_size), not sqrt(head_dim)",
        "scale by 1/sqrt(head_dim)", {"scores": m.scores_hidden_scale}, **HELD),
    Bug("scale_over_d", "scale", "scores divided by head_dim, not its square root",
        "scale by 1/sqrt(head_dim)", {"scores": m.scores_over_d}, **HELD),
    # softmax
    Bug("softmax_wrong_dim", "softmax", "softmax over dim=-2 (the queries)",
        "the softmax looks normalised over the queries (dim=-2): normalise over the keys (dim=-1)",
        {"softmax": m.softmax_over_queries}),
    Bug("softmax_low_precision", "softmax_precision", "scores cast to float16 for the softmax",
        "the softmax looks computed in float16: compute it (max, exp, sum) in float32",
        {"softmax": m.softmax_in(torch.float16)}),
    Bug("softmax_bf16", "softmax_precision", "softmax computed in bfloat16",
        "compute the softmax in float32", {"softmax": m.softmax_in(torch.bfloat16)}, **HELD),
    Bug("softmax_no_max", "softmax", "exp(scores) without subtracting the row max",
        "subtract the row max before exp", {"softmax": m.softmax_no_max}, **HELD),
    Bug("masked_rows_nan", "nonfinite", "torch.softmax over an all -inf row gives NaN",
        "a fully masked row must give zeros, not a softmax over all -inf", {"softmax": m.softmax_nan_rows}),
    # masks
    Bug("causal_missing", "causal_mask", "no causal mask",
        "tokens attend to later tokens: the causal mask is missing", {"allowed": m.allowed_no_causal}),
    Bug("causal_excludes_self", "causal_mask", "tril(-1): a token cannot see itself",
        "the causal mask hides each token from itself (triu(0) instead of triu(1)): the diagonal must be visible",
        {"allowed": m.allowed_strict}),
    Bug("causal_sees_next", "causal_mask", "tril(1): each token sees the next one",
        "the causal mask lets each token see the next one", {"allowed": m.allowed_sees_next}, **HELD),
    Bug("padding_ignored", "padding_mask", "attention_mask never applied",
        "padded keys are attended to: apply attention_mask (1 = token, 0 = padding) to the keys",
        {"allowed": m.allowed_no_padding}),
    Bug("padding_inverted", "padding_mask", "attention_mask read as 1 = masked",
        "attention_mask looks inverted: 1 = token, 0 = padding", {"allowed": m.allowed_padding_inverted}, **HELD),
    Bug("padding_on_queries", "padding_mask", "attention_mask applied to the query axis instead of the key axis",
        "mask the keys, [B, 1, 1, S]", {"allowed": m.allowed_padding_on_queries}, **HELD),
    # heads and GQA
    Bug("gqa_repeat", "gqa", "K/V heads expanded with repeat (tiling), not repeat_interleave",
        "query heads look mapped to KV heads with `repeat` (h % Hkv) instead of `repeat_interleave` "
        "(KV head j serves query heads j*g..j*g+g-1)", {"expand": m.expand_tiled}, shows=grouped),
    Bug("gqa_first_kv_head", "gqa", "every query head reads KV head 0",
        "expand K/V with repeat_interleave", {"expand": m.expand_first_head}, shows=grouped, **HELD),
    Bug("head_split_no_transpose", "head_layout", "view(B, H, S, d) without the transpose",
        "heads look split without the transpose: view(B, S, H, d).transpose(1, 2), not view(B, H, S, d)",
        {"split": m.split_no_transpose}),
    Bug("v_from_k_proj", "projection", "v computed with k_proj's weights (copy-paste)",
        "v = x @ v_proj.T", {"project": m.project_v_with_k}, **HELD),
    Bug("o_proj_transposed", "output_projection", "ctx @ o_proj instead of ctx @ o_proj.T",
        "the output projection looks transposed: use context @ o_proj.T (nn.Linear layout [out, in])",
        {"output": m.output_transposed}, shows=square_o),
    # RoPE
    Bug("rope_interleaved", "rope", "interleaved RoPE pairs on HF-ordered weights",
        "RoPE pairs look interleaved (2i, 2i+1) on HF-ordered weights: HF checkpoints pair channel i with i + d/2 "
        "(rotate_half)", {"rotate": m.rotate_interleaved}),
    Bug("rope_q_only", "rope", "RoPE applied to q only", "only q looks rotated: apply RoPE to k as well",
        {"rotate": m.rotate_q_only}),
    Bug("rope_wrong_sign", "rope", "rotate_half as cat(x2, -x1)", "rotate_half must be cat(-x2, x1)",
        {"rotate": m.rotate_wrong_sign}, **HELD),
    Bug("rope_on_v", "rope", "RoPE applied to v as well", "RoPE applies to q and k only",
        {"rotate": m.rotate_v_too}, **HELD),
    Bug("positions_ignored", "rope", "arange(S) instead of position_ids",
        "rotate by the given position_ids", {"tables": m.tables_arange}, **HELD),
    Bug("decode_wrong_position", "rope", "the decoded token placed at position len(cache), not position_ids",
        "the decoded token's position", fn=m.decode_wrong_position),
    Bug("llama3_missing", "rope_frequencies", "llama3 frequency scaling skipped",
        "frequencies look unscaled: the llama3 RoPE scaling (factor {factor:g}) is missing",
        {"tables": m.tables_no_llama3}, shows=llama3),
    Bug("llama3_factor_8", "rope_frequencies", "llama3 scaling with factor 8 (Meta's hard-coded value), not 32",
        "take rope_parameters from the config", {"tables": m.tables_factor8}, shows=llama3, **HELD),
    Bug("rope_theta_10000", "rope_frequencies", "rope_theta hard-coded to 10000 (Llama 2's)",
        "take rope_theta from the config", {"tables": m.tables_theta_10000},
        shows=lambda c: c["rope_parameters"]["rope_theta"] != 10000.0, **HELD),
    # RoPE scaling (the synthetic rope-linear, rope-dynamic and rope-yarn fixtures; llama3 above)
    Bug("linear_scaling_missing", "rope_frequencies", "linear scaling skipped: positions not divided by the factor",
        "frequencies look unscaled: the linear RoPE scaling (positions / factor {factor:g}) is missing",
        {"tables": m.tables_params(m.default_rope)}, shows=rope_type("linear")),
    Bug("linear_factor_squared", "rope_frequencies", "linear scaling applied twice (factor squared)",
        "divide the positions by the factor once", {"tables": m.tables_params(m.square_factor)},
        shows=rope_type("linear"), **HELD),
    Bug("dynamic_always", "rope_frequencies", "dynamic NTK scaling applied at every length (static NTK)",
        "the rotary base looks scaled at every length: dynamic scaling changes it only past max_position_embeddings, "
        "from the longest position seen", {"tables": m.tables_static_ntk}, shows=rope_type("dynamic")),
    Bug("dynamic_never", "rope_frequencies", "dynamic scaling never applied", "rescale past the trained context",
        {"tables": m.tables_params(m.default_rope)}, shows=rope_type("dynamic"), **HELD),
    Bug("yarn_attention_factor_missing", "rope_frequencies", "yarn's attention factor (mscale on cos/sin) left out",
        "cos/sin look unscaled: yarn multiplies them by its attention factor (0.1 ln(factor) + 1 by default)",
        {"tables": m.tables_unscaled_cos_sin}, shows=rope_type("yarn")),
    Bug("yarn_betas_swapped", "rope_frequencies", "yarn's beta_fast and beta_slow swapped",
        "beta_fast bounds the high-frequency band", {"tables": m.tables_params(m.swap_betas)}, shows=rope_type("yarn"),
        **HELD),
    Bug("angles_bf16", "rope_precision", "position * inv_freq computed in bfloat16",
        "RoPE angles look computed in bfloat16: compute position * inv_freq in float32",
        {"tables": m.tables_bf16_angles}),
    Bug("rope_table_bf16", "rope_precision", "the cos/sin cache kept in bfloat16 (gpt-fast's default)",
        "the RoPE cos/sin table looks stored in bfloat16: keep it in float32",
        {"tables": m.tables_rounded(torch.bfloat16)}),
    Bug("rope_table_fp16", "rope_precision", "the cos/sin cache kept in float16",
        "keep the cos/sin table in float32", {"tables": m.tables_rounded(torch.float16)}, **HELD),
    Bug("pv_fp16_accumulator", "accumulation_precision", "probabilities @ values accumulated in float16",
        "the probabilities-times-values sum looks accumulated in float16: accumulate in float32",
        {"aggregate": m.aggregate_fp16_accumulator}),
    # precision bugs as people write them (held out: the diagnosis must name them from the error's signature)
    Bug("softmax_torch_fp16", "softmax_precision", "torch.softmax on scores cast to float16 (it subtracts the max)",
        "compute the softmax in float32", {"softmax": m.softmax_torch_half}, **HELD),
    Bug("softmax_fp16_no_max", "softmax_precision", "the softmax by hand in float16, the row max never subtracted",
        "compute the softmax in float32 and subtract the row max", {"softmax": m.softmax_half_no_max}, **HELD),
    Bug("exp_bf16", "softmax_precision", "exp(s - max) computed in bfloat16", "compute exp in float32",
        {"softmax": m.softmax_exp_bf16}, **HELD),
    Bug("pv_matmul_fp16", "accumulation_precision", "P @ V as a float16 matmul", "multiply P by V in float32",
        {"aggregate": m.aggregate_in(torch.float16)}, **HELD),
    Bug("pv_matmul_bf16", "accumulation_precision", "P @ V as a bfloat16 matmul", "multiply P by V in float32",
        {"aggregate": m.aggregate_in(torch.bfloat16)}, **HELD),
    Bug("tiled_fp16_row_sum", "softmax_precision", "a tiled loop (32-key blocks) keeping its running sum l in float16",
        "keep l in float32", {"core": core_step("fp16_row_sum", block=32)}, **HELD),
    Bug("dynamic_every_length", "rope_frequencies", "dynamic NTK rescaling the base at every length, from the length",
        "rescale only past max_position_embeddings", {"tables": m.tables_dynamic_every_length},
        shows=rope_type("dynamic"), **HELD),
    # o_proj and the tiled loop
    Bug("tiled_no_rescale", "tiling", "accumulator not rescaled when the running max grows",
        "rescale the accumulator by exp(m - m') when the running max changes", {"core": core_step("no_rescale")},
        **HELD),
    Bug("tiled_drops_last_block", "tiling", "S // block blocks: the last partial block dropped",
        "loop over ceil(S / block) blocks", {"core": core_step("drop_last_block")}),
    Bug("tiled_diagonal_mask", "tiling", "diagonal tile masked with the tile-local key index",
        "mask the diagonal tile with global indices", {"core": core_step("diag_mask")}, **HELD),
    # kernels (the core contract): what only shows with Sq < Sk, a flag or the lse
    Bug("causal_top_left", "causal_mask", "causal mask tril() aligned top-left: wrong with a KV cache (Sq < Sk)",
        "the causal mask looks aligned top-left: with Sq < Sk queries are the last Sq of the Sk keys, so query i "
        "sees keys 0 .. Sk - Sq + i (bottom-right)", {"allowed": m.allowed_top_left}, contract="core"),
    Bug("causal_flag_ignored", "causal_mask", "the causal=False flag ignored: always causal",
        "honour causal=False", {"allowed": m.allowed_always_causal}, contract="core", **HELD),
    Bug("scale_arg_ignored", "scale", "the scale argument ignored: always 1/sqrt(d)",
        "use the given scale", fn=m.scale_arg_ignored, contract="core", **HELD),
    Bug("lse_base2", "lse", "lse returned in base 2 (log2 of the row sum)",
        "lse looks like a base-2 logarithm: return the natural log, lse = m + log(l)", fn=m.lse_wrong("base2"),
        contract="core"),
    Bug("lse_unscaled", "lse", "lse of the unscaled scores", "compute lse from the scaled scores",
        fn=m.lse_wrong("unscaled"), contract="core", **HELD),
    # kernels: the contract's window, softcap and sinks (keywords.py)
    Bug("window_one_too_many", "sliding_window", "the window's left edge one key too far: p - j <= left + 1",
        "sees one key too many at the window's left edge: the window is (W, 0) where transformers' sliding_window W "
        "is (W - 1, 0): keep key j when p - left <= j", {"window": kw.window_one_too_many}, contract="core"),
    Bug("window_one_too_few", "sliding_window", "the window's left edge one key short: p - j < left",
        "misses the key at the window's left edge: the window is (W - 2, 0) where transformers' sliding_window W is "
        "(W - 1, 0): keep key j when p - left <= j (<=, not <)", {"window": kw.window_one_too_few}, contract="core"),
    Bug("window_right_one_too_many", "sliding_window", "the window's right edge one key too far: j <= p + right + 1",
        "sees one key too many at the window's right edge: keep key j when j <= p + right",
        {"window": kw.window_right_one_too_many}, contract="core"),
    Bug("window_top_left", "sliding_window", "the window placed around query index i, not its position Sk - Sq + i",
        "the window looks aligned top-left: with Sq < Sk query i sits at position p = Sk - Sq + i, and its window is "
        "p - left .. p + right (bottom-right, like the causal mask)", {"window": kw.window_top_left},
        contract="core"),
    Bug("window_ignored", "sliding_window", "the window keyword accepted and never applied",
        "apply the window: key j visible only if p - left <= j <= p + right", {"window": kw.window_ignored},
        contract="core", **HELD),
    Bug("softcap_before_scale", "softcap", "the cap applied to q k^T before the 1/sqrt(d) scale",
        "the scores look capped before the scale: cap the scaled scores, softcap * tanh(scale q k^T / softcap)",
        {"cap": kw.cap_before_scale}, contract="core"),
    Bug("softcap_missing", "softcap", "the softcap keyword accepted and never applied",
        "the scores are not capped: apply softcap * tanh(scores / softcap) after the scale",
        {"cap": kw.cap_missing}, contract="core"),
    Bug("softcap_after_mask", "softcap", "the additive mask added before the cap: masked scores become -softcap",
        "masked keys get weight: the cap turns the mask's -inf into -softcap; cap the scores, then mask them",
        fn=kw.cap_after_mask, contract="core"),
    Bug("softcap_on_probabilities", "softcap", "the cap applied to the probabilities, not the scores",
        "cap the scores before the softmax", fn=kw.cap_on_probabilities, contract="core", **HELD),
    Bug("sinks_by_kv_head", "sinks", "sinks[h // g]: each query head reads its KV head's sink",
        "the query heads look to use their KV head's sink: one sink logit per query head, sinks[h]",
        {"sink_of": kw.sinks_by_kv_head}, contract="core"),
    Bug("sink_sign_flipped", "sinks", "exp(-sinks[h]) in the softmax's denominator",
        "the sink's logit looks negated: the denominator gets exp(sinks[h])", {"sink_of": kw.sink_sign_flipped},
        contract="core"),
    Bug("sink_as_key_with_value", "sinks", "the sink joined as a key whose value is the first token's",
        "a sink has no value: drop its column after the softmax", {"sink_softmax": kw.sink_with_value},
        contract="core", **HELD),
    Bug("sink_after_normalising", "sinks", "the keys' softmax divided by (1 + exp(sink)) afterwards",
        "put exp(sinks[h]) in the denominator beside the keys' exp(s_j), before dividing",
        {"sink_softmax": kw.sink_after_normalising}, contract="core", **HELD),
    Bug("lse_without_sink", "sinks", "out right; lse the log of the keys' sum, the sink left out",
        "lse must include the sink: log(exp(sinks[h]) + sum_j exp(s_j))", fn=kw.lse_without_sink, contract="core",
        **HELD),
    # the families' fields (family_mistakes.py): q/k norms, biases, scale, window, softcap, sinks, partial rotary
    Bug("qk_norm_all_heads", "qk_norm", "q/k RMSNorm over all heads at once (OLMo-2 style) on a per-head model",
        "q/k look normalised over all heads at once: normalise each head over its own head_dim",
        {"norm": fm.norm_all_heads}, shows=qk_norm),
    Bug("qk_norm_after_rope", "qk_norm", "q_norm/k_norm applied after RoPE", "apply q_norm/k_norm before RoPE",
        fn=fm.norm_after_rope, shows=qk_norm, **HELD),
    Bug("qk_norm_gain_w", "qk_norm", "Gemma's (1 + w) norm gain read as w",
        "the q/k norm gain looks applied as w: Gemma multiplies by (1 + w)", {"norm": fm.norm_other_gain},
        shows=plus_one),
    Bug("k_norm_missing", "qk_norm", "k_norm never applied", "apply k_norm (per head, before RoPE)",
        fn=fm.without("k_norm"), shows=qk_norm, **HELD),
    Bug("k_bias_missing", "qkv_bias", "k_proj's bias not loaded", "k_proj.bias looks missing: add it after k_proj",
        fn=fm.without("k_proj.bias"), shows=biased),
    Bug("v_bias_missing", "qkv_bias", "v_proj's bias not loaded", "add v_proj.bias", fn=fm.without("v_proj.bias"),
        shows=biased, **HELD),
    Bug("o_bias_missing", "output_projection", "o_proj's bias not loaded",
        "o_proj.bias looks missing: add it after o_proj", fn=fm.without("o_proj.bias"), shows=o_biased),
    Bug("query_pre_attn_scalar_ignored", "scale", "scores scaled by 1/sqrt(head_dim), query_pre_attn_scalar ignored",
        "scale the scores by query_pre_attn_scalar ** -0.5", {"keywords": fm.with_keywords(fm.head_dim_scale)},
        shows=pre_attn_scalar),
    Bug("local_layer_global_rope", "rope_frequencies", "Gemma 3's local layers rotated with the global RoPE base",
        "take rope_parameters[layer_type]: local layers use their own base", {"tables": fm.rope_of(FULL)},
        shows=local_rope),
    Bug("partial_rotary_all_dims", "partial_rotary", "partial_rotary_factor ignored: every channel rotated",
        "rotate only the first partial_rotary_factor * head_dim channels", fn=fm.rotate_all, shows=partial),
    Bug("partial_rotary_last_dims", "partial_rotary", "the last rotary_dim channels rotated, not the first",
        "rotate the first rotary_dim channels", {"rotate": fm.rotate_last}, shows=partial, **HELD),
    Bug("window_missing_on_sliding", "sliding_window", "sliding layers attend to every earlier key",
        "apply sliding_window on sliding_attention layers", {"keywords": fm.with_keywords(fm.no_window)},
        shows=sliding),
    Bug("window_on_full_layers", "sliding_window", "the sliding window applied on full-attention layers too",
        "only layer_type sliding_attention is windowed", {"keywords": fm.with_keywords(fm.window_everywhere)},
        shows=full_beside_sliding, **HELD),
    Bug("gemma2_softcap_missing", "softcap", "attn_logit_softcapping never applied (Gemma 2)",
        "cap the scores: softcap tanh(s / softcap), after the scale", {"keywords": fm.with_keywords(fm.no_softcap)},
        shows=capped),
    Bug("sinks_dropped", "sinks", "GPT-OSS's sinks never loaded: a plain softmax",
        "add each head's sink logit to the softmax's denominator", fn=fm.without("sinks"), shows=sinks),
    # the serving path (serving.py, serving_mistakes.py): paged KV caches, split-KV decoding, packed varlen batches
    Bug("block_table_ignored", "block_table", "pages assumed contiguous from block 0: the block table ignored",
        "token t of sequence b is at block_table[b, t // page_size], slot t % page_size: read the table",
        fn=sv.paged(locate=sm.locate_contiguous), contract="paged"),
    Bug("page_index_off_by_one", "block_table", "block_table[b, t // page_size - 1]: the page index off by one",
        "the page of token t is block_table[b, t // page_size]", fn=sv.paged(locate=sm.locate_page_before),
        contract="paged", **HELD),
    Bug("slot_off_by_one_at_page_boundary", "block_table", "a page's last slot read from the next page",
        "page t // page_size, slot t % page_size: the same t for both", fn=sv.paged(locate=sm.locate_slot_boundary),
        contract="paged"),
    Bug("seqlens_plus_one", "seqlens", "one slot past each sequence read (cache_seqlens taken as the last index)",
        "cache_seqlens[b] counts the sequence's tokens, the new ones included: read keys 0 .. cache_seqlens[b] - 1",
        fn=sv.paged(length=sm.length_plus_one), contract="paged"),
    Bug("seqlens_minus_one", "seqlens", "the last key missed (cache_seqlens taken before the new tokens)",
        "cache_seqlens[b] includes the new tokens", fn=sv.paged(length=sm.length_minus_one), contract="paged",
        **HELD),
    Bug("seqlens_ignored", "seqlens", "cache_seqlens ignored: every sequence read to the longest",
        "read each sequence to its own cache_seqlens[b]", fn=sv.paged(length=sm.length_longest), contract="paged"),
    Bug("decode_query_at_zero", "causal_mask", "the new tokens placed at positions 0 .. Sq - 1 (top-left)",
        "query i of sequence b sits at cache_seqlens[b] - Sq + i (the sequence's end)",
        fn=sv.paged(query_pos=sm.query_at_zero), contract="paged"),
    Bug("split_merge_unrescaled", "split_merge", "split-KV partials added without rescaling to the common max",
        "merge the parts by their lse: out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i",
        fn=sv.paged(merge=sm.merge_unrescaled, splits=4), contract="paged"),
    Bug("split_merge_average", "split_merge", "split-KV parts' outputs averaged", "weigh each part by exp(lse_i - lse)",
        fn=sv.paged(merge=sm.merge_average, splits=4), contract="paged", **HELD),
    Bug("split_merge_lse_max", "lse", "the merged lse is the largest part's, not their logsumexp",
        "lse = logsumexp over the parts' lse", fn=sv.paged(merge=sm.merge_lse_max, splits=4), contract="paged"),
    Bug("varlen_sees_neighbour", "varlen_boundary", "each packed sequence's keys start at its neighbour's",
        "sequence b's keys are rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1 only",
        fn=sv.varlen(bounds_k=sm.bounds_with_neighbour), contract="varlen"),
    Bug("cu_seqlens_off_by_one", "varlen_boundary", "cu_seqlens[b + 1] - 1 taken as a sequence's end",
        "sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (the end exclusive)",
        fn=sv.varlen(bounds_q=sm.bounds_short, bounds_k=sm.bounds_short), contract="varlen", **HELD),
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
    Bug("grad_dsinks_sign", "grad_softmax", "dsinks = +sum P_sink D: the sinks' gradient negated",
        "the sinks' gradient looks negated: dsinks[h] = -sum over rows of P_sink * D (P_sink = exp(sinks[h] - lse), "
        "D = rowsum(dO * O))", fn=kw.dsinks_times(-1.0), contract="core", kind="backward"),
    Bug("grad_dsinks_zero", "grad_softmax", "the sinks taken as a constant in the backward: dsinks = 0",
        "write dsinks[h] = -sum P_sink * D", fn=kw.dsinks_times(0.0), contract="core", kind="backward", **HELD),
    Bug("grad_rope_forward_rotation", "grad_rope", "RoPE's backward rotates by +angle (the forward rotation)",
        "RoPE's backward looks like the forward rotation: the gradient goes back through the inverse (sin negated)",
        {"rotate": m.rotate_backward_forward}, kind="backward"),
    Bug("grad_o_proj_input_transposed", "grad_projection", "o_proj's backward: grad_input = grad_out @ W.T",
        "the output projection's input gradient looks transposed: grad_ctx = grad_out @ o_proj (not .T)",
        {"output": m.output_backward_transposed}, kind="backward", shows=square_o),
    Bug("grad_q_proj_first_sequence", "grad_projection", "q_proj's weight gradient from the first sequence only",
        "sum the weight gradient over the batch", {"project": m.project_backward_unsummed}, kind="backward", **HELD),
]  # fmt: skip
CATALOG += [Bug(contract="ring", **e) for e in ring_catalog.ENTRIES]  # context parallelism (ring_catalog.py)

BY_NAME = {b.name: b for b in CATALOG}


def suspects(config: dict) -> list[Bug]:
    """The entries the diagnosis may match on a layer: not held out, pipeline steps, able to show here."""
    return [b for b in CATALOG if not b.held_out and b.kind == "forward" and b.contract == "layer" and b.steps
            and b.shows(config)]  # fmt: skip


def kernel_suspects() -> list[Bug]:
    """The entries the diagnosis may match on a kernel: not held out, expressible as a kernel, no process group."""
    return [b for b in CATALOG if not b.held_out and b.kind == "forward" and b.contract != "ring"
            and b.kernel() is not None]  # fmt: skip


def grad_suspects(contract: str, config: dict | None = None) -> list[Bug]:
    """The backward entries the gradient diagnosis may match: not held out, for this contract."""
    return [b for b in CATALOG if not b.held_out and b.kind == "backward" and b.contract == contract
            and (config is None or b.shows(config))]  # fmt: skip


def pick(name: str) -> Bug:
    return BY_NAME[name]

