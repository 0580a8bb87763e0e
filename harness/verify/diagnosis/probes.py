"""Probes: the implementation asked directly, on inputs and weights of the diagnosis's own.

    causality     changing later tokens must not change earlier outputs (causal_mask)
    padding       changing padded tokens must not change real tokens' outputs (padding_mask)
    head mapping  one token, weights that write each KV head's index into its values: which KV head each query
                  head used (gqa)
    precision     how the error against float64 moves with the positions, the scores' magnitude and the length
"""

from __future__ import annotations

import torch

from harness.common import heads
from harness.reference import Reference, Reference64
from harness.verify.compare import PRECISION_LIMIT, rounding_floor
from harness.verify.diagnosis.evidence import Diagnosis, maxdiff


def probes(config, w, runs, failing, call) -> Diagnosis | None:
    if call is None:
        return None
    for probe in (_causality, _padding, _head_mapping):
        found = ask(probe, config, w, runs, failing, call)
        if found is not None:
            return found
    return None


def ask(probe, *args) -> Diagnosis | None:
    """A probe's answer; None when the implementation cannot answer it (that decides nothing)."""
    try:
        return probe(*args)
    except Exception:  # noqa: BLE001 - whatever the implementation raises
        return None


def _noise(out: torch.Tensor) -> float:
    """What float32 recomputation may move an output by: far above rounding, far below any bug."""
    return 1e-4 * max(float(out.float().abs().max()), 1e-6)


def _causality(config, w, runs, failing, call) -> Diagnosis | None:
    """Outputs at positions < t must not move when the tokens from t on change."""
    r = runs.get("short")
    if r is None or r.dtype != torch.float32 or not failing:
        return None
    S = r.x.shape[1]
    t = S // 2
    x2 = r.x.clone()
    x2[:, t:] = torch.randn(x2[:, t:].shape, generator=torch.Generator().manual_seed(99)) * r.x.std()
    out2 = call(x2, w, r.pos, r.mask)
    moved = float((out2[:, :t].double() - r.out[:, :t].double()).abs().max())
    if moved > _noise(r.out):
        return Diagnosis("causal_mask", f"changing tokens {t}..{S - 1} changes the outputs of tokens 0..{t - 1} "
                         f"(by {moved:.2e}): tokens attend to later tokens; mask keys j > i (bottom-right "
                         "aligned), keep the diagonal", "probe:causality")  # fmt: skip
    return None


def _padding(config, w, runs, failing, call) -> Diagnosis | None:
    """Real tokens' outputs must not move when padded tokens change."""
    r = runs.get("left_padding")
    if r is None or "left_padding" not in failing or r.mask is None:
        return None
    pad = ~r.mask.bool()  # (B, S)
    x2 = r.x.clone()
    x2[pad] = torch.randn(x2[pad].shape, generator=torch.Generator().manual_seed(98)) * r.x.std()
    out2 = call(x2, w, r.pos, r.mask)
    keep = r.mask.bool()
    moved = maxdiff(out2, r.out, keep)
    if moved > _noise(r.out):
        return Diagnosis("padding_mask", f"changing padded tokens changes real tokens' outputs (by {moved:.2e}): "
                         "padded keys are attended to; mask the keys where attention_mask is 0 "
                         "(1 = token, 0 = padding), [B, 1, 1, S]", "probe:padding")  # fmt: skip
    return None


def _head_mapping(config, w, runs, failing, call) -> Diagnosis | None:
    """One token attends only to itself, so query head h's context is the value of the KV head it uses. Weights
    that make KV head j's value (j + 1) in its first channel, and o_proj that copies head h's first channel to
    output channel h, read that mapping off the output."""
    if "one_token" not in failing:
        return None
    h = heads(config)
    if h.D < h.H:
        return None
    x = torch.zeros(1, 1, h.D)
    x[0, 0, 0] = 1.0
    probe = {n: torch.zeros_like(t) for n, t in w.items()}  # biases 0; q/k norms of zero vectors stay 0
    if "sinks" in probe:  # a sink logit far below the token's own score (0): no mass to the sink
        probe["sinks"] = torch.full_like(w["sinks"], -1e4)
    for j in range(h.Hkv):
        probe["v_proj"][j * h.d, 0] = j + 1.0  # v of KV head j = (j + 1, 0, ..., 0)
    for i in range(h.H):
        probe["o_proj"][i, i * h.d] = 1.0  # output channel i = first channel of query head i's context
    out = call(x, probe, torch.zeros(1, 1, dtype=torch.long), None)[0, 0, : h.H].double()
    used = torch.round(out) - 1
    if (out - (used + 1)).abs().max() > 1e-3 or used.min() < 0 or used.max() >= h.Hkv:
        return None  # not readable: the fault is elsewhere (projections, o_proj)
    used = [int(u) for u in used]
    want = [i // h.g for i in range(h.H)]
    if used == want:
        return None
    shown = ", ".join(f"{i}->{u}" for i, u in enumerate(used[: min(h.H, 12)]))
    return Diagnosis("gqa", f"query heads read KV heads {shown}{' ...' if h.H > 12 else ''}; expected query head h "
                     f"-> KV head h // {h.g} (repeat_interleave: KV head j serves query heads j*g..j*g+g-1)",
                     "probe:head_mapping")  # fmt: skip


def precision_ratio(config, w, call, x, pos) -> float:
    """The implementation's distance from float64 over transformers' own, on these inputs (no padding)."""
    out = call(x, w, pos, None).double()
    ref64 = Reference64(config, w)(x, pos)
    h64 = float((Reference(config, w)(x, pos).double() - ref64).abs().max())
    return float((out - ref64).abs().max()) / (h64 + rounding_floor(ref64, torch.float32))


def precision_probes(config, w, runs, imprecise, call) -> Diagnosis | None:
    """With every position 0, RoPE is the identity: precise there and imprecise elsewhere points at the rotary
    tables. Then, with RoPE out of the way: error that grows with the scores' magnitude points at the softmax,
    error that grows with the length at the accumulation."""
    D = heads(config).D
    g = torch.Generator().manual_seed(97)
    zero = runs.get("zero_positions")
    rope_off = zero is not None and zero.out is not None and "zero_positions" not in imprecise
    if rope_off and set(imprecise) - {"zero_positions"}:
        return Diagnosis("rope_precision", "precise with every position 0 (RoPE the identity) but not elsewhere: "
                         "the rotary tables or angles lose precision; compute position * inv_freq and cos/sin in "
                         "float32 and keep them there", "probe:positions")  # fmt: skip
    x = torch.randn(1, 32, D, generator=g)
    base = precision_ratio(config, w, call, x, torch.zeros(1, 32, dtype=torch.long))
    big = precision_ratio(config, w, call, 4 * x, torch.zeros(1, 32, dtype=torch.long))
    if big > PRECISION_LIMIT and big > 4 * base:
        return Diagnosis("softmax_precision", f"the error grows with the scores' magnitude ({base:.0f}x -> {big:.0f}x "
                         "transformers' with inputs x4, RoPE off): the scores or the softmax lose precision; keep "
                         "q k^T, the max, exp and the sum in float32", "probe:magnitude")  # fmt: skip
    x = torch.randn(1, 512, D, generator=g)
    long = precision_ratio(config, w, call, x, torch.zeros(1, 512, dtype=torch.long))
    if long > PRECISION_LIMIT and long > 2 * base:
        return Diagnosis("accumulation_precision", f"the error grows with the length ({base:.0f}x -> {long:.0f}x "
                         "transformers' from 32 to 512 tokens, RoPE off): a product or an accumulator loses "
                         "precision; accumulate probabilities times values in float32", "probe:length")  # fmt: skip
    return None
