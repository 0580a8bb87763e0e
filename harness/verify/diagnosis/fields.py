"""Suspects from the family's own fields: each field of the config (and tensor of the weights) that changes the
attention, read the ways ports get it wrong. Built from the fixture at hand, so a fixture of a new family needs no
new diagnosis code for the mistakes its fields explain (as the RoPE suspects come from its rope parameters).

    q_norm, k_norm            skipped (one or both); over all heads at once (OLMo-2's layout) instead of per head;
                              after RoPE instead of before; the other gain (w vs Gemma's 1 + w)        qk_norm
    q/k/v_proj.bias           all dropped, or one                                                      qkv_bias
    o_proj.bias               dropped                                                                  output_projection
    query_pre_attn_scalar     ignored: 1/sqrt(head_dim) instead                                        scale
    attn_logit_softcapping    dropped; applied before the scale                                        softcap
    sliding_window            dropped on a sliding layer, or one key too wide; applied on a full one   sliding_window
    sinks                     dropped                                                                  sinks
    partial rotary            every channel rotated; the last rotary_dim channels rotated              partial_rotary
    rope per layer type       another layer type's parameters (Gemma 3's global base on a local layer) rope_frequencies
"""

from __future__ import annotations

from collections.abc import Callable

from harness.bugs import family_mistakes as fm
from harness.bugs import pipeline
from impl import rope
from impl.layer import keywords
from impl.projection import ONE_PLUS_W


def _kw(change: Callable[[dict, dict], dict]) -> Callable:
    return pipeline.layer(keywords=fm.with_keywords(change))


def _norms(config: dict, w: dict, make) -> list:
    norms = [n for n in ("q_norm", "k_norm") if w.get(n) is not None]
    if not norms:
        return []
    form, other = ("(1 + w)", "w") if config.get("model_type") in ONE_PLUS_W else ("w", "(1 + w)")
    out = [make("qk_norm:missing", "qk_norm", "q and k look un-normalised: apply q_norm and k_norm (RMSNorm over "
                "each head's head_dim) before RoPE", fm.without(*norms))]  # fmt: skip
    if len(norms) > 1:
        out += [make(f"qk_norm:{n}_missing", "qk_norm", f"{n} looks skipped: apply it (RMSNorm over each head's "
                     "head_dim) before RoPE", fm.without(n)) for n in norms]  # fmt: skip
    return out + [
        make("qk_norm:all_heads", "qk_norm", "q/k look normalised over all heads at once (OLMo-2 style): normalise "
             "each head over its own head_dim", pipeline.layer(norm=fm.norm_all_heads)),
        make("qk_norm:after_rope", "qk_norm", "q/k look normalised after RoPE: apply q_norm/k_norm before the "
             "rotation", fm.norm_after_rope),
        make("qk_norm:gain", "qk_norm", f"the q/k norm gain looks applied as {other}: this family "
             f"({config.get('model_type')}) multiplies by {form}", pipeline.layer(norm=fm.norm_other_gain)),
    ]  # fmt: skip


def _biases(config: dict, w: dict, make) -> list:
    qkv = [n for n in ("q_proj", "k_proj", "v_proj") if w.get(f"{n}.bias") is not None]
    out = []
    if len(qkv) > 1:
        out.append(make("qkv_bias:all_missing", "qkv_bias", "q/k/v look computed without their biases: add "
                        f"{', '.join(n + '.bias' for n in qkv)}", fm.without(*(n + ".bias" for n in qkv))))
    out += [make(f"qkv_bias:{n}", "qkv_bias", f"{n}.bias looks missing: add it after the projection (before the "
                 "head split, the norms and RoPE)", fm.without(f"{n}.bias")) for n in qkv]  # fmt: skip
    if w.get("o_proj.bias") is not None:
        out.append(make("o_proj_bias", "output_projection", "o_proj.bias looks missing: add it after o_proj",
                        fm.without("o_proj.bias")))  # fmt: skip
    return out


def _kernel_fields(config: dict, w: dict, make) -> list:
    kw, (d, _) = keywords(config, w), rope.dims(config)
    out = []
    if "scale" in kw and abs(kw["scale"] - d**-0.5) > 1e-12:
        out.append(make("scale:query_pre_attn_scalar", "scale", f"scores look scaled by 1/sqrt(head_dim) = 1/sqrt("
                        f"{d}): this family scales by query_pre_attn_scalar ** -0.5 = 1/sqrt("
                        f"{config['query_pre_attn_scalar']:g})", _kw(fm.head_dim_scale)))  # fmt: skip
    if kw.get("softcap"):
        cap = kw["softcap"]
        out += [
            make("softcap:missing", "softcap", f"scores look uncapped: apply attn_logit_softcapping, {cap:g} tanh(s / "
                 f"{cap:g}), after the scale and before the mask", _kw(fm.no_softcap)),
            make("softcap:before_scale", "softcap", f"the cap looks applied before the scale: scale first, then "
                 f"{cap:g} tanh(s / {cap:g})", _kw(lambda k, c: {**k, "softcap": cap * k.get("scale", d**-0.5)})),
        ]  # fmt: skip
    W = config.get("sliding_window")
    if W and config.get("layer_type") == "sliding_attention":
        out += [
            make("sliding_window:missing", "sliding_window", f"this sliding layer looks unwindowed: each query sees "
                 f"only itself and the {W - 1} keys before it (sliding_window = {W})", _kw(fm.no_window)),
            make("sliding_window:one_wider", "sliding_window", f"the window looks one key too wide: sliding_window = "
                 f"{W} keys in all, the query included", _kw(lambda k, c: {**k, "window": (W, 0)})),
        ]  # fmt: skip
    elif W and config.get("layer_type") == "full_attention":
        out.append(make("sliding_window:on_full_layer", "sliding_window", f"this full-attention layer looks windowed "
                        f"({W} keys): only layer_type 'sliding_attention' is", _kw(fm.window_everywhere)))
    if kw.get("sinks") is not None:
        out.append(make("sinks:missing", "sinks", "the softmax looks sink-free: add each head's sink logit to the "
                        "denominator (a column with no value)", fm.without("sinks")))  # fmt: skip
    return out


def _rope_fields(config: dict, make) -> list:
    d, rd = rope.dims(config)
    out = []
    if rd < d:
        out += [
            make("partial_rotary:all", "partial_rotary", f"every channel looks rotated: rotate only the first {rd} of "
                 f"{d} (partial_rotary_factor), with frequencies over {rd}", fm.rotate_all),
            make("partial_rotary:last", "partial_rotary", f"the last {rd} channels look rotated: rotate the first "
                 f"{rd} and pass the other {d - rd} through", pipeline.layer(rotate=fm.rotate_last)),
        ]  # fmt: skip
    rp = config.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in rp.values()):
        mine = rope.layer_rope(config)["rope_parameters"]
        for other, params in rp.items():
            if other == config.get("layer_type") or params == mine or not isinstance(params, dict):
                continue
            out.append(make(f"rope:{other}_parameters", "rope_frequencies", f"the rotary frequencies look computed "
                            f"with the {other} layers' rope parameters (rope_theta {params.get('rope_theta'):g}) on "
                            f"this {config.get('layer_type')} layer (rope_theta {mine.get('rope_theta'):g}): take "
                            "rope_parameters[layer_type]", pipeline.layer(tables=fm.rope_of(other))))  # fmt: skip
    return out


def field_suspects(config: dict, w: dict, make) -> list:
    """make(name, stage, hint, fn) -> a Suspect; one per way the family's fields are misread (module docstring)."""
    return _norms(config, w, make) + _biases(config, w, make) + _kernel_fields(config, w, make) + _rope_fields(
        config, make)
