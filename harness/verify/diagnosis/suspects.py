"""Suspects: what would the output be under this mistake? Each is re-run in float64 on the failing inputs; the one
the output matches (much closer to it than to the correct reference) is named.

    the catalog's bugs that are not held out (harness/bugs/catalog.py), but its precision bugs: a lowered step is
    named by the error's signature (signature.py), never by resemblance to a known bug
    the family's own fields misread (fields.py: q/k norms, biases, scale, window, softcap, sinks, partial rotary,
    rope per layer type)
    the rotary frequencies recomputed with each of the fixture's own rope parameters changed (rope_frequencies)
    a fitted constant on the scores (any wrong scale): on every failing scenario, or on RoPE-off inputs alone
    a fitted rotary base, per scenario (rope_frequencies: frequencies off, even by an amount that changes with the
    length)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.bugs import catalog, pipeline
from harness.common import heads
from harness.verify.diagnosis.evidence import EXACT, MAX_SUSPECT_LEN, Diagnosis, maxdiff, rms
from harness.verify.diagnosis.fields import field_suspects
from harness.verify.diagnosis.signature import channels, layer_case
from harness.verify.scenarios import tagged
from impl.layer import keywords
from impl.rope import dims, inv_freq, layer_rope

PRECISION = {"rope_precision", "softmax_precision", "accumulation_precision"}  # named by signature.py only


@dataclass
class Suspect:
    name: str
    stage: str
    hint: str
    fn: Callable  # a layer-contract function; run in float64


def suspects(config, w, runs, failing) -> Diagnosis | None:
    fp32 = [n for n in failing if runs[n].dtype == torch.float32 and runs[n].x.shape[1] <= MAX_SUSPECT_LEN]
    if not fp32:
        return None
    found = field_suspects(config, w, Suspect)  # first: on a family's layer its own fields are the likeliest
    found += [Suspect(b.name, b.stage, b.hint_for(config), b.layer()) for b in catalog.suspects(config)
              if b.stage not in PRECISION]  # fmt: skip
    found += rope_suspects(config)
    best = None
    for s in found:
        worst = match(s.fn, config, w, runs, fp32)
        if worst is not None and (best is None or worst < 0.99 * best[1]):  # a tie keeps the first (the catalog's)
            best = (s, worst)
        if best is not None and best[1] < EXACT:  # the output is this suspect's computation: look no further
            break
    if best is not None:
        return Diagnosis(best[0].stage, best[0].hint, best[0].name)
    return scale_fit(config, w, runs, fp32)


def match(fn, config, w, runs, names) -> float | None:
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
        got, base = rms(r.out, sus, r.keep), rms(r.out, r.ref, r.keep)
        noise = 0.0 if r.ref64 is None else rms(r.ref, r.ref64, r.keep)
        if not got <= 0.3 * base + 2 * noise:
            return None
        worst = max(worst, got / max(base, 1e-30))
    return worst


def rope_suspects(config: dict) -> list[Suspect]:
    """The rotary frequencies recomputed with one of the fixture's own rope parameters changed: its scaling
    dropped, or one numeric parameter (theta, a factor, a context length) multiplied or divided by 2, 4 or 8, or
    set to a value codebases hard-code. Built from the config at hand, whatever its rope_type (the layer's own
    parameters where they differ by layer type)."""
    config = layer_rope(config)
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
        rd = dims(config)[1]
        with_params({"rope_type": "default", "rope_theta": rp["rope_theta"] * rp["factor"] ** (rd / (rd - 2))},
                    "rope:dynamic_always", "the rotary base looks scaled at every length (static NTK): dynamic "
                    "scaling changes it only past max_position_embeddings, from the longest position seen")  # fmt: skip
    if kind == "yarn":  # the attention factor yarn puts on cos/sin, dropped
        def unscaled(c, p, dt):
            cos, sin = pipeline.tables(c, p, dt)
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


def scale_fit(config, w, runs, names) -> Diagnosis | None:
    """Fit one constant a on the scores (scores * a): if the output is that function of a for some a != 1 on
    every failing scenario, the scale is wrong, whatever expression produced it. Fitted with RoPE off (all positions
    0) when that scenario fails: if it alone is explained, the scale is wrong and something else (RoPE's
    frequencies or scaling, say) is too."""
    seq = [n for n in names if runs[n].x.shape[1] > 1]
    if not seq:
        return None
    probe = "zero_positions" if "zero_positions" in seq else min(seq, key=lambda n: runs[n].x.shape[1])
    r = runs[probe]

    def resid(log2a: float) -> float:
        fn = pipeline.layer(scores=lambda q, k, d: pipeline.scores(q, k, d) * 2.0**log2a)
        return maxdiff(r.out, pipeline.float64(fn, r.x, w, r.pos, r.mask, config), r.keep)

    a = 2.0 ** fit(resid, [i / 4 for i in range(-32, 33)])  # a from 1/256 to 256
    if abs(a - 1) < 1e-3:
        return None
    fn = pipeline.layer(scores=lambda q, k, d: pipeline.scores(q, k, d) * a)
    alone = match(fn, config, w, runs, names) is None
    if alone and (probe != "zero_positions" or match(fn, config, w, runs, [probe]) is None):
        return None
    d = heads(config).d
    want = keywords(config, w).get("scale", d**-0.5)  # the family's: 1/sqrt(head_dim), or query_pre_attn_scalar's
    named = f"1/sqrt(head_dim) = 1/sqrt({d})" if want == d**-0.5 else \
        f"query_pre_attn_scalar ** -0.5 = 1/sqrt({want**-2:.4g})"
    eff = a * want  # the scale the implementation applies
    more = (" (fitted with RoPE off, all positions 0: other failures are not all explained by it, so a second "
            "problem remains, RoPE's frequencies or scaling for one)") if alone else ""  # fmt: skip
    return Diagnosis(
        "scale",
        f"scores look multiplied by {eff:.4g} = 1/sqrt({eff**-2:.4g}) instead of {named} = {want:.4g} "
        f"({a:.3g}x too {'large' if a > 1 else 'small'}): scale q k^T by {named.split(' = ')[0]}{more}",
        "scale_fit:rope_off" if alone else "scale_fit",
    )


def fit(resid: Callable[[float], float], grid: list[float]) -> float:
    """The t of the grid where resid(t) is least, refined by a golden-section search between its neighbours."""
    errs = [resid(t) for t in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(20):
        m1, m2 = hi - (hi - lo) / 1.618, lo + (hi - lo) / 1.618
        lo, hi = (lo, m2) if resid(m1) < resid(m2) else (m1, hi)
    return (lo + hi) / 2


def rope_fit(config, w, runs, failing) -> Diagnosis | None:
    """With RoPE off passing (all positions 0) and some scenario of positions other than 0..S-1 failing, the rotary
    base fitted on each failing scenario: when a base explains each (the output much closer to it than to the
    reference), the frequencies are off, by a constant or by an amount that changes with the length (dynamic
    scaling applied where it must not be). Fitted on 256 output channels, checked on all."""
    if "zero_positions" not in runs or "zero_positions" in failing or not set(failing) & tagged("positions"):
        return None
    names = [n for n in failing if runs[n].dtype == torch.float32 and runs[n].x.shape[1] <= MAX_SUSPECT_LEN
             and int(runs[n].pos.max()) > 0]  # fmt: skip
    config = layer_rope(config)  # the layer's own rope parameters (Gemma 3's differ by layer type)
    rp = config["rope_parameters"]
    theta = rp["rope_theta"]
    found = []
    for n in sorted(names, key=lambda n: runs[n].x.shape[:2].numel())[:3]:
        r = runs[n]
        case = layer_case(config, w, r.x, r.pos, r.mask)
        out = r.out[..., channels(r.out.shape[-1])].double()
        keep = r.keep

        def cfg(t: float) -> dict:
            return {**config, "rope_parameters": {**rp, "rope_theta": theta * 2.0**t}}

        def resid(t: float, case=case, r=r, out=out) -> float:
            return rms(out, case.run(frozenset(), None, pipeline.tables(cfg(t), r.pos, torch.float64)), r.keep)

        t = fit(resid, [i / 2 for i in range(-24, 25)])  # the base x 1/4096 to 4096
        fn = pipeline.layer(tables=lambda c, p, dt, t=t: pipeline.tables(cfg(t), p, dt))
        noise = 0.0 if r.ref64 is None else rms(r.ref, r.ref64, keep)
        if abs(t) < 1e-3 or not rms(r.out, pipeline.float64(fn, r.x, w, r.pos, r.mask, config), keep) <= (
                0.3 * rms(r.out, r.ref, keep) + 2 * noise):  # fmt: skip
            return None
        found.append((int(r.pos.max()) + 1, theta * 2.0**t))
    if not found:
        return None
    bases = sorted(found)
    if max(b for _, b in bases) < 1.02 * min(b for _, b in bases):
        hint = (f"the rotary frequencies look computed with rope_theta = {bases[0][1]:.4g} instead of the config's "
                f"{theta:g}: take rope_parameters from the config")  # fmt: skip
    else:
        seen = ", ".join(f"{b:.4g} at {L} positions" for L, b in bases)
        hint = (f"the rotary base looks different at each length ({seen}; the config's is {theta:g}): the "
                "frequencies change with the length where they must not (dynamic scaling rescales only past "
                "max_position_embeddings, from the longest position seen)")  # fmt: skip
    return Diagnosis("rope_frequencies", hint, "rope_fit")
