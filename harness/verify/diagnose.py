"""Diagnosis: name the first broken stage of a failing implementation, with a hint in the user's terms.

It works on black boxes: it sees the implementation's outputs on the scenarios, and may call it again on inputs
and weights of its own (probes). In order:

1. non-finite outputs: `nonfinite` (rows that see no key give NaN), or `softmax` when only huge scores overflow;
2. stage by stage, for implementations that return their intermediates (naive): the first that differs from HF;
3. suspects, re-run in float64 on the failing inputs; the one the output matches (much closer to it than to the
   correct reference, on every failing float32 scenario) is named:
   - the catalog's bugs that are not held out (harness/bugs/catalog.py);
   - the rotary frequencies recomputed with each of the fixture's own rope parameters changed (scaling dropped,
     a factor or theta off): `rope_frequencies`;
   - a fitted constant on the scores (any wrong scale): `scale`;
4. probes that ask the implementation directly:
   - causality: changing later tokens must not change earlier outputs (`causal_mask`);
   - padding: changing padded tokens must not change real tokens' outputs (`padding_mask`);
   - head mapping: with one token and weights that write each KV head's index into its values, the output reads
     off which KV head every query head used (`gqa`);
5. which rows are wrong: exact-zero rows after a sequence's first token (skipped blocks: `tiling`); only the last
   token, only where positions are not 0..S-1 (a decode path's position: `rope`);
6. the pattern of failing scenarios: one token (projections), all positions 0 passing (RoPE), only non-contiguous
   positions (position_ids), only long unequal distances (frequencies), every sequence above a length (tiling),
   only padding, only x50 scores (softmax stability), only half precision.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.bugs import catalog, pipeline
from harness.common import compared_rows, heads
from harness.stages import STAGES  # noqa: F401 (the vocabulary, re-exported)
from harness.verify.scenarios import tagged
from impl import masks

MAX_SUSPECT_LEN = 257  # suspects are re-run on the failing float32 scenarios up to this length (float64 is slow)
EXACT = 1e-3  # a suspect this much closer than the reference is the computation itself (float32 rounding apart)


@dataclass
class Run:
    """One scenario's evidence."""

    x: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor | None
    out: torch.Tensor  # the implementation's output (non-finite where it crashed)
    ref: torch.Tensor  # HF in the scenario's dtype
    dtype: torch.dtype
    ref64: torch.Tensor | None = None  # HF in float64

    @property
    def keep(self) -> torch.Tensor:
        return compared_rows(self.x, self.mask)

    @property
    def err(self) -> float:
        return _maxdiff(self.out, self.ref, self.keep)


@dataclass
class Diagnosis:
    stage: str
    hint: str
    matched: str | None = None  # the suspect, probe or pattern that explains it


Call = Callable[[torch.Tensor, dict, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _maxdiff(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()[keep]
    return float(torch.nan_to_num(d, nan=float("inf")).max()) if d.numel() else 0.0


def diagnose(fixture, runs: dict[str, Run], failing: list[str], passing: list[str], call: Call | None = None,
             fn: Callable | None = None) -> Diagnosis:  # fmt: skip
    """runs: every scenario's evidence; call(x, weights, pos, mask) runs the implementation again (probes);
    fn: the implementation itself when it runs in this process (stage-by-stage for built-ins)."""
    config = fixture.config
    weights = {k: v.float() for k, v in fixture.weights.items()}
    steps = (
        lambda: _nonfinite(failing, runs),
        lambda: _stagewise(config, weights, fn, runs),
        lambda: _suspects(config, weights, runs, failing),
        lambda: _probes(config, weights, runs, failing, call),
        lambda: _row_pattern(failing, runs),
    )
    for step in steps:
        found = step()
        if found is not None:
            return found
    return _pattern(failing, passing, runs)


# ---------------------------------------------------------------------------------------------------------
# 1. non-finite outputs


def _nonfinite(failing, runs) -> Diagnosis | None:
    bad = [n for n in failing if not torch.isfinite(runs[n].out).all()]
    if not bad:
        return None
    empty_rows = any(not runs[n].keep.all() for n in bad)  # a scenario where some rows see no key at all
    if set(bad) <= tagged("large_scores"):
        return Diagnosis("softmax", "NaN/Inf only when scores are in the thousands: exp overflows; subtract the "
                         "row max before exp (and keep the running max in a tiled loop)", "overflow")  # fmt: skip
    hint = "NaN/Inf in the output" + (
        " of rows whose every key is masked (padding): a fully masked row must give zeros, not a softmax over "
        "all -inf" if empty_rows else f" (scenarios: {', '.join(bad)})"
    )
    return Diagnosis("nonfinite", hint)


# ---------------------------------------------------------------------------------------------------------
# 2. stage by stage (implementations that return their intermediates)


def _stagewise(config, w, fn, runs) -> Diagnosis | None:
    try:
        if fn is None or "return_intermediates" not in inspect.signature(fn).parameters or "short" not in runs:
            return None
    except (TypeError, ValueError):
        return None
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from harness.reference import Reference, additive_mask

    r = runs["short"]
    x, pos, mask = r.x.float(), r.pos, r.mask
    _, st = fn(x, w, config=config, position_ids=pos, attention_mask=mask, return_intermediates=True)
    ref = Reference(config, w)
    a = ref.attn
    B, S, _ = x.shape
    shp = (B, S, -1, a.head_dim)
    with torch.no_grad():
        q, k, v = (getattr(a, n)(x).view(shp).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        cos, sin = ref.rope(x, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kk = k.repeat_interleave(a.num_key_value_groups, 1)
        scores = q @ kk.transpose(-2, -1) * a.scaling
        probs = torch.softmax(scores + additive_mask(S, S, mask, B), -1)
        ctx = probs @ v.repeat_interleave(a.num_key_value_groups, 1)
    checks = [("v", v, "projection"), ("q", q, "rope"), ("k", k, "rope"), ("scores", scores, "scale"),
              ("probs", probs, "softmax"), ("context", ctx, "gqa")]  # fmt: skip
    for name, want, stage in checks:
        got = st.get(name)
        if got is None or got.shape != want.shape or (got.float() - want).abs().max() > 1e-4:
            return Diagnosis(stage, f"stage-by-stage: '{name}' is the first intermediate that differs from "
                             "transformers'", f"intermediate:{name}")  # fmt: skip
    return Diagnosis("output_projection", "every intermediate matches transformers' up to the context: the head "
                     "merge or o_proj is wrong", "intermediate:output")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# 3. suspects: what would the output be under this mistake?


@dataclass
class Suspect:
    name: str
    stage: str
    hint: str
    fn: Callable  # a layer-contract function; run in float64


def _suspects(config, w, runs, failing) -> Diagnosis | None:
    fp32 = [n for n in failing if runs[n].dtype == torch.float32 and runs[n].x.shape[1] <= MAX_SUSPECT_LEN]
    if not fp32:
        return None
    found = [Suspect(b.name, b.stage, b.hint_for(config), b.layer()) for b in catalog.suspects(config)]
    found += rope_suspects(config) + precision_suspects()
    best = None
    for s in found:
        worst = _match(s.fn, config, w, runs, fp32)
        if worst is not None and (best is None or worst < 0.99 * best[1]):  # a tie keeps the first (the catalog's)
            best = (s, worst)
        if best is not None and best[1] < EXACT:  # the output is this suspect's computation: look no further
            break
    if best is not None:
        return Diagnosis(best[0].stage, best[0].hint, best[0].name)
    return _scale_fit(config, w, runs, fp32)


def _rms(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    d = torch.nan_to_num((a.double() - b.double())[keep], nan=float("inf"))
    return float(d.square().mean().sqrt()) if d.numel() else 0.0


def _match(fn, config, w, runs, names) -> float | None:
    """The worst ratio rms(out - suspect) / rms(out - ref) over the scenarios when the suspect explains each of
    them, else None. Explains: the output is at least 3x closer to the suspect than to the reference, give or take
    the rounding a float32 run adds (transformers' own distance from float64 here). A root mean square, not a
    max: a suspect that rounds to half precision rounds a few elements the other way than a float32 run does."""
    worst = 0.0
    for n in names:
        r = runs[n]
        try:
            sus = pipeline.float64(fn, r.x, w, r.pos, r.mask, config)
        except Exception:  # noqa: BLE001 - a suspect that cannot run on these inputs explains nothing
            return None
        got, base = _rms(r.out, sus, r.keep), _rms(r.out, r.ref, r.keep)
        noise = 0.0 if r.ref64 is None else _rms(r.ref, r.ref64, r.keep)
        if not got <= 0.3 * base + 2 * noise:
            return None
        worst = max(worst, got / max(base, 1e-30))
    return worst


def _round(t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
    return t.to(to).to(t.dtype)


def precision_steps() -> list[tuple[str, str, str, dict]]:
    """Each step of the pipeline lowered to bfloat16 or float16, the rest exact: a rotary table or angles, the
    scores, the softmax, the probabilities, the accumulator -> (name, stage, hint, pipeline steps)."""
    out = []
    for to in (torch.bfloat16, torch.float16):
        name = str(to).removeprefix("torch.")

        def tables_low(c, p, dt, to=to):
            cos, sin = pipeline.tables(c, p, dt)
            return _round(cos, to), _round(sin, to)

        def angles_low(c, p, dt, to=to):
            from impl.rope import inv_freq

            inv, scaling = inv_freq(c, seq_len=int(p.max()) + 1 if p.numel() else None)
            ang = (p.to(to)[..., None] * inv.to(to)).to(dt)  # (B, S, rd/2)
            emb = torch.cat((ang, ang), dim=-1)
            return emb.cos() * scaling, emb.sin() * scaling

        out += [
            (f"precision:table_{name}", "rope_precision", f"the RoPE cos/sin table looks rounded to {name}: keep it "
             "in float32 (a cache in the model's dtype is the usual cause)", {"tables": tables_low}),
            (f"precision:angles_{name}", "rope_precision", f"the RoPE angles (position * inv_freq) look computed in "
             f"{name}: compute them in float32", {"tables": angles_low}),
            (f"precision:scores_{name}", "softmax_precision", f"the scores q k^T look rounded to {name} before the "
             "softmax: keep them in float32",
             {"scores": lambda q, k, d, to=to: _round(pipeline.scores(q, k, d), to)}),
            (f"precision:softmax_{name}", "softmax_precision", f"the softmax (max, exp, sum) looks computed in {name}: "
             "compute it in float32",
             {"softmax": lambda s, a, to=to: masks.masked_softmax(s.to(to), a).to(s.dtype)}),
            (f"precision:probs_{name}", "accumulation_precision", f"the probabilities look rounded to {name} before "
             "they multiply the values: keep them in float32",
             {"aggregate": lambda p, v, to=to: pipeline.aggregate(_round(p, to), v)}),
            (f"precision:accumulator_{name}", "accumulation_precision", f"probabilities times values look accumulated "
             f"in {name}: accumulate in float32", {"aggregate": lambda p, v, to=to: _accumulate_in(p, v, to)}),
        ]  # fmt: skip
    return out


def precision_suspects() -> list[Suspect]:
    return [Suspect(n, stage, hint, pipeline.layer(**steps)) for n, stage, hint, steps in precision_steps()]


def _accumulate_in(p: torch.Tensor, v: torch.Tensor, to: torch.dtype, block: int = 16) -> torch.Tensor:
    acc = torch.zeros(*p.shape[:-1], v.shape[-1], dtype=v.dtype)
    for j in range(0, v.shape[-2], block):
        acc = _round(acc + p[..., j : j + block].to(v.dtype) @ v[..., j : j + block, :], to)
    return acc


def rope_suspects(config: dict) -> list[Suspect]:
    """The rotary frequencies recomputed with one of the fixture's own rope parameters changed: its scaling
    dropped, or one numeric parameter (theta, a factor, a context length) multiplied or divided by 2, 4 or 8, or
    set to a value codebases hard-code. Built from the config at hand, whatever its rope_type."""
    from impl.rope import inv_freq

    rp = config["rope_parameters"]
    kind = rp.get("rope_type", "default")
    out = []
    seen = {_signature(inv_freq, config)}  # variants that compute the config's own frequencies are no suspects

    def with_params(params: dict, name: str, hint: str) -> None:
        cfg = {**config, "rope_parameters": params}
        try:  # a variant the rope code cannot compute is no suspect
            sig = _signature(inv_freq, cfg)
        except (KeyError, ValueError, ZeroDivisionError, TypeError, OverflowError):
            return
        if sig in seen:  # the same frequencies as an earlier suspect: it says nothing new
            return
        seen.add(sig)
        out.append(Suspect(name, "rope_frequencies", hint,
                           pipeline.layer(tables=lambda c, p, dt, cfg=cfg: pipeline.tables(cfg, p, dt))))  # fmt: skip

    if kind != "default":
        with_params({"rope_type": "default", "rope_theta": rp["rope_theta"]}, f"rope:{kind}_missing",
                    f"frequencies look unscaled: the {kind} RoPE scaling of rope_parameters is missing")  # fmt: skip
    if kind == "dynamic":  # applied at every length, at its full factor (static NTK), instead of past the context
        from impl.rope import dims

        rd = dims(config)[1]
        with_params({"rope_type": "default", "rope_theta": rp["rope_theta"] * rp["factor"] ** (rd / (rd - 2))},
                    "rope:dynamic_always", "the rotary base looks scaled at every length (static NTK): dynamic "
                    "scaling changes it only past max_position_embeddings, from the longest position seen")  # fmt: skip
    if kind == "yarn":  # the attention factor yarn puts on cos/sin, dropped
        def unscaled(c, p, dt):
            cos, sin = pipeline.tables(c, p, dt)
            from impl.rope import inv_freq

            _, scaling = inv_freq(c, seq_len=int(p.max()) + 1, dtype=dt)
            return cos / scaling, sin / scaling

        out.append(Suspect("rope:yarn_attention_factor_missing", "rope_frequencies", "cos/sin look unscaled: yarn "
                           "multiplies them by its attention factor (from factor, mscale, mscale_all_dim)",
                           pipeline.layer(tables=unscaled)))  # fmt: skip
    # the frequency bands: the two bounds of llama3's and yarn's ramp swapped (read with transformers' defaults)
    bands = {"llama3": ("low_freq_factor", "high_freq_factor", None, None), "yarn": ("beta_fast", "beta_slow", 32, 1)}
    if kind in bands:
        a, b, da, db = bands[kind]
        va, vb = rp.get(a) or da, rp.get(b) or db
        with_params({**rp, a: vb, b: va}, f"rope:{a}<->{b}", f"the frequency band looks bounded the other way round "
                    f"({a}={vb:g}, {b}={va:g}, the config's swapped): take both from rope_parameters")  # fmt: skip
        rp = {**rp, a: va, b: vb}  # and each bound varied below, from its value or transformers' default
    for key, val in rp.items():
        if key == "rope_type" or isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        values = {val * m for m in (1 / 8, 1 / 4, 1 / 2, 2, 4, 8)}
        if key == "rope_theta":
            values |= {10000.0, 500000.0, 1000000.0}
        if "factor" in key:
            values |= {1.0, 8.0, 16.0, 32.0}
        for new in sorted(values - {val}):
            new = type(val)(new) if isinstance(val, int) and float(new).is_integer() else new
            with_params({**rp, key: new}, f"rope:{key}={new:g}",
                        f"the rotary frequencies look computed with {key}={new:g} instead of the config's {val:g}: "
                        "take rope_parameters from the config")  # fmt: skip
    return out


def _signature(inv_freq, config) -> tuple:
    top = int(config.get("max_position_embeddings") or 4096)
    sig = []
    for n in (top // 2, 2 * top):  # dynamic scaling depends on the length: two of them
        inv, scaling = inv_freq(config, seq_len=n, dtype=torch.float64)
        sig.append((tuple(round(float(f), 12) for f in inv), round(float(scaling), 12)))
    return tuple(sig)


def _scale_fit(config, w, runs, names) -> Diagnosis | None:
    """Fit one constant a on the scores (scores * a): if the output is that function of a for some a != 1 on
    every failing scenario, the scale is wrong, whatever expression produced it."""
    seq = [n for n in names if runs[n].x.shape[1] > 1]
    if not seq:
        return None
    probe = min(seq, key=lambda n: runs[n].x.shape[1])
    r = runs[probe]

    def resid(log2a: float) -> float:
        fn = pipeline.layer(scores=lambda q, k, d: pipeline.scores(q, k, d) * 2.0**log2a)
        return _maxdiff(r.out, pipeline.float64(fn, r.x, w, r.pos, r.mask, config), r.keep)

    grid = [i / 4 for i in range(-32, 33)]  # a from 1/256 to 256
    errs = [resid(t) for t in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(20):  # golden section on log2 a
        m1, m2 = hi - (hi - lo) / 1.618, lo + (hi - lo) / 1.618
        lo, hi = (lo, m2) if resid(m1) < resid(m2) else (m1, hi)
    a = 2.0 ** ((lo + hi) / 2)
    if abs(a - 1) < 1e-3:
        return None
    fn = pipeline.layer(scores=lambda q, k, d: pipeline.scores(q, k, d) * a)
    if _match(fn, config, w, runs, names) is None:
        return None
    d = heads(config).d
    eff = a * d**-0.5  # the scale the implementation applies
    return Diagnosis(
        "scale",
        f"scores look multiplied by {eff:.4g} = 1/sqrt({eff**-2:.4g}) instead of 1/sqrt(head_dim) = "
        f"1/sqrt({d}) = {d**-0.5:.4g} ({a:.3g}x too {'large' if a > 1 else 'small'}): scale q k^T by "
        "1/sqrt(head_dim)",
        "scale_fit",
    )


# ---------------------------------------------------------------------------------------------------------
# 4. probes: the implementation asked directly


def _probes(config, w, runs, failing, call) -> Diagnosis | None:
    if call is None:
        return None
    for probe in (_causality, _padding, _head_mapping):
        found = _ask(probe, config, w, runs, failing, call)
        if found is not None:
            return found
    return None


def _ask(probe, *args) -> Diagnosis | None:
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
    moved = _maxdiff(out2, r.out, keep)
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
    probe = {n: torch.zeros_like(t) for n, t in w.items()}
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


# ---------------------------------------------------------------------------------------------------------
# precision: an implementation that passes the gate but is far less precise than transformers


def diagnose_precision(fixture, runs: dict[str, Run], imprecise: list[str], call: Call | None) -> Diagnosis:
    """imprecise: the scenarios that pass the gate with a precision ratio above the limit. The same suspects as
    a failure (a step lowered to bfloat16 or float16 matches the output), then probes: how the error moves with
    the positions, the scores' magnitude and the length."""
    config = fixture.config
    w = {k: v.float() for k, v in fixture.weights.items()}
    names = [n for n in imprecise if runs[n].dtype == torch.float32 and runs[n].x.shape[1] <= MAX_SUSPECT_LEN]
    if names:
        found = [Suspect(b.name, b.stage, b.hint_for(config), b.layer()) for b in catalog.suspects(config)
                 if b.stage.endswith("_precision")] + precision_suspects()  # fmt: skip
        best = None
        for s in found:
            worst = _match(s.fn, config, w, runs, names)
            if worst is not None and (best is None or worst < 0.99 * best[1]):
                best = (s, worst)
        if best is not None:
            return Diagnosis(best[0].stage, best[0].hint, best[0].name)
    if call is not None:
        found = _ask(_precision_probes, config, w, runs, imprecise, call)
        if found is not None:
            return found
    return Diagnosis("unknown", "no single step explains the lost precision: " + ", ".join(sorted(imprecise)))


def precision_ratio(config, w, call, x, pos) -> float:
    """The implementation's distance from float64 over transformers' own, on these inputs (no padding)."""
    from harness.reference import Reference, Reference64
    from harness.verify.compare import rounding_floor

    out = call(x, w, pos, None).double()
    ref64 = Reference64(config, w)(x, pos)
    h64 = float((Reference(config, w)(x, pos).double() - ref64).abs().max())
    return float((out - ref64).abs().max()) / (h64 + rounding_floor(ref64, torch.float32))


def _precision_probes(config, w, runs, imprecise, call) -> Diagnosis | None:
    """With every position 0, RoPE is the identity: precise there and imprecise elsewhere points at the rotary
    tables. Then, with RoPE out of the way: error that grows with the scores' magnitude points at the softmax,
    error that grows with the length at the accumulation."""
    from harness.verify.compare import PRECISION_LIMIT

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


# ---------------------------------------------------------------------------------------------------------
# 5. which rows are wrong



def _row_pattern(failing, runs) -> Diagnosis | None:
    """Rows of exact zeros where tokens are (skipped blocks), or only the last token of each sequence (a decode
    path), seen on every failing scenario."""
    zero_rows, last_only = False, bool(failing)
    for n in failing:
        r = runs[n]
        keep = r.keep  # (B, S)
        first = keep.float().argmax(-1, keepdim=True)  # (B, 1) the first real token of each row
        after_first = keep & (torch.arange(r.x.shape[1])[None] > first)  # (B, S)
        zero = (r.out.float().abs().amax(-1) == 0) & (r.ref.float().abs().amax(-1) > 0)  # (B, S)
        zero_rows |= bool((zero & after_first).any())  # a first token that sees nothing can be 0; later ones not
        err = (r.out.double() - r.ref.double()).abs().amax(-1).masked_fill(~keep, 0)  # (B, S)
        last_only &= r.x.shape[1] > 1 and bool(err[:, -1].max() > 0) and bool(err[:, :-1].max() <= 1e-2 * err.max())
    if zero_rows:
        return Diagnosis("tiling", "whole output rows are exactly zero where tokens are: query or key blocks were "
                         "skipped (the last partial block dropped? loop over ceil(S / block) blocks, not "
                         "S // block)", "zero_rows")  # fmt: skip
    if last_only and set(failing) <= tagged("positions"):
        return Diagnosis("rope", "only the last token is wrong, and only where positions are not 0..S-1: a decode "
                         "(KV-cache) path places the new token at the cache length; rotate it by its position_ids",
                         "last_token")  # fmt: skip
    return None


# ---------------------------------------------------------------------------------------------------------
# 6. the pattern of failing scenarios


def _pattern(failing, passing, runs) -> Diagnosis:
    f, p = set(failing), set(passing)
    if "one_token" in f:
        return Diagnosis("projection", "even a single token (which attends only to itself) is wrong: check the "
                         "q/k/v/o projections, the head split and merge, and the KV-head mapping", "one_token")
    contiguous = {n for n in runs if n not in tagged("positions") and n != "one_token"}
    if f and f <= tagged("positions") and "zero_positions" in f and (p & contiguous):
        return Diagnosis("rope", "wrong only where positions are not 0..S-1 (padding, restarts, sparse, all zero): "
                         "position_ids look ignored or misread; rotate each token by its own position_ids "
                         "(RoPE is relative, so contiguous positions hide this)", "positions")  # fmt: skip
    if f and f <= {"sparse_positions", "packed", "rope_stress"}:
        return Diagnosis("rope_frequencies", "only unequal long distances between positions fail: the rotary "
                         "frequencies are off (rope_theta, rope scaling, float32 angles)", "sparse_positions")
    fl = {n: runs[n].x.shape[1] for n in f if runs[n].dtype == torch.float32}  # failing float32 lengths
    pl = {n: runs[n].x.shape[1] for n in p if runs[n].dtype == torch.float32}
    if fl and pl and min(fl.values()) > max(pl.values()):
        return Diagnosis("tiling", f"every float32 sequence of {min(fl.values())} tokens or more fails and every "
                         "shorter one passes: a block-size effect (the accumulator rescaling across key blocks, the "
                         "last partial block, the diagonal blocks' mask)", "length")  # fmt: skip
    if "zero_positions" in p and (f & {"short", "prompt", "sparse_positions", "packed"}):
        return Diagnosis("rope", "correct with every position 0 (RoPE off) but wrong otherwise: the rotary "
                         "embedding is applied wrongly", "zero_positions")
    if f == {"left_padding"}:
        return Diagnosis("padding_mask", "only the padded batch fails: check how attention_mask (1 = token, "
                         "0 = padding) masks the keys", "left_padding")
    if f <= {"len_257", "len_1000", "long_2048"} and "short" in p:
        return Diagnosis("tiling", "short sequences pass but lengths off the block grid fail: check the last "
                         "partial block and the masking of diagonal blocks", "len_257")
    if f and f <= tagged("large_scores"):
        return Diagnosis("softmax", "only inputs scaled x50 fail: the softmax is not stable (subtract the running "
                         "max; rescale the accumulator when the max changes)", "scaled_x50")
    if f <= {"bfloat16", "float16"}:
        return Diagnosis("softmax", "only half precision fails: do the softmax and the accumulation in float32",
                         "half")
    return Diagnosis("unknown", "no single stage explains the failures: " + ", ".join(sorted(f)))
