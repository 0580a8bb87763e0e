"""Precision by signature: which step's rounding the output's error shows, whatever code produced it.

A step computed in float16 or bfloat16 leaves its own pattern in the output: rounding the scores moves each
probability by p (ds - sum p ds), rounding the P @ V accumulator moves the context by the sum of its roundings, and
two different roundings leave two unrelated patterns (rounding errors are as good as random). So each way of lowering
a step is simulated: the layer (or kernel) re-run in float64 on the scenario's own inputs and the fixture's weights
with that step's tensors rounded to the dtype (an operation "in float16" is the exact operation on rounded inputs,
rounded), and its error sim - ref64 is the step's signature. The implementation's error, out - ref64 over the
compared rows, is fitted (least squares, coefficients >= 0) on the signatures of each stage in one dtype; the
(stage, dtype) that explains the largest share of it, R^2 >= MIN_R2, is named, with the way of lowering that
carries the most of the fit. Below MIN_R2 no rounding explains the error, and the stage is left to the diagnosis's
general paths. Each scenario weighs the same (its error normalised), so one with large scores does not drown the
others; the shortest is fitted first, and when no stage explains it the others are not tried (the diagnosis asks
the signature before its suspects, so an error that is no rounding must cost little here); the output is compared
on a fixed subset of its channels (o_proj is the costly part, and a few hundred channels carry the same pattern).

    rope_precision          inv_freq, the angles (position * inv_freq), the cos/sin tables
    projection              the q/k/v projections
    softmax_precision       q and k entering q k^T, the scores, s - max, exp, exp(s) with no max subtracted, the
                            row sum (once, or running over key blocks as a tiled loop keeps it)
    accumulation_precision  P @ V: the probabilities and values entering it, its running accumulator, its result
    output_projection       o_proj

Outputs that went non-finite, or rows that came out zero, have a signature of their own: an unshifted exp overflows
past scores of 11.09 in float16 and of 88.72 in float32 or bfloat16, so the rows it hit tell the dtype
(overflow_dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harness.common import heads
from harness.verify.diagnosis.evidence import MAX_SUSPECT_LEN, Diagnosis, Run
from impl import masks
from impl.gqa import repeat_kv
from impl.layer import keywords
from impl.projection import merge_heads, rms_norm, split_heads
from impl.rope import apply_half, inv_freq

MIN_R2 = 0.5  # the share of the error's energy one stage's roundings must explain (a correlation of 0.71)
BLOCK = 16  # the key block of the P @ V accumulator
BLOCKS = (16, 32, 64, 128)  # the key blocks of a tiled loop's running sum (each a way: a block changes the pattern)
CHANNELS = 256  # output channels compared, at most
SCENARIOS = 3  # scenarios fitted, at most (the shortest)
LOW = (torch.float16, torch.bfloat16)

# the ways of lowering a step: name -> (stage, the tensors rounded, what it is in the user's terms)
WAYS: dict[str, tuple[str, frozenset, str]] = {
    name: (stage, frozenset(points.split()), what)
    for name, stage, points, what in [
        ("inv_freq", "rope_precision", "inv_freq", "the rotary frequencies inv_freq"),
        ("angles", "rope_precision", "angles", "the RoPE angles position * inv_freq"),
        ("angles_computed", "rope_precision", "positions inv_freq angles", "the RoPE angles position * inv_freq"),
        ("tables", "rope_precision", "tables", "the RoPE cos/sin table"),
        ("tables_computed", "rope_precision", "positions inv_freq angles tables", "the RoPE cos/sin table"),
        ("projection", "projection", "projection", "the q/k/v projections' outputs"),
        ("projection_computed", "projection", "proj_in projection", "the q/k/v projections"),
        ("qk", "softmax_precision", "qk", "q and k as they enter q k^T"),
        ("qk_computed", "softmax_precision", "qk scores", "q k^T"),
        ("scores", "softmax_precision", "scores", "the scores before the softmax"),
        ("softmax_io", "softmax_precision", "scores probs", "the softmax's input and output"),
        ("softmax_computed", "softmax_precision", "scores shift exp sum probs", "the softmax (max, exp, sum)"),
        ("softmax_unshifted", "softmax_precision", "scores exp_unshifted sum probs",
         "the softmax, without subtracting the row max,"),
        ("exp_computed", "softmax_precision", "shift exp", "exp(s - max)"),
        ("exp", "softmax_precision", "exp", "exp's output"),
        ("exp_unshifted", "softmax_precision", "exp_unshifted", "exp of the scores with no max subtracted"),
        ("sum", "softmax_precision", "sum", "the softmax's row sum"),
        *((f"running_sum{b}", "softmax_precision", f"running_sum{b}",
           f"a tiled loop's running row sum (online softmax, {b}-key blocks)") for b in BLOCKS),
        ("probs", "accumulation_precision", "probs", "the probabilities as they multiply the values"),
        ("values", "accumulation_precision", "values", "the values as they enter P @ V"),
        ("pv_computed", "accumulation_precision", "probs values context", "P @ V"),
        ("accumulator", "accumulation_precision", "accumulator", "the P @ V accumulator over key blocks"),
        ("accumulator_computed", "accumulation_precision", "probs values accumulator",
         "P @ V and its accumulator over key blocks"),
        ("context", "accumulation_precision", "context", "the P @ V result"),
        ("output", "output_projection", "output", "o_proj's output"),
        ("output_computed", "output_projection", "context o_in output", "o_proj"),
    ]
}  # fmt: skip
LAYER_ONLY = {"positions", "inv_freq", "angles", "tables", "proj_in", "projection", "o_in", "output"}
KERNEL_WAYS = [n for n, (_, points, _) in WAYS.items() if not points & LAYER_ONLY]
FIX = {
    "rope_precision": "compute inv_freq, position * inv_freq and cos/sin in float32 and keep the table there (a "
    "cache in the model's dtype is the usual cause)",
    "projection": "keep the projections' outputs in float32 (or the input's dtype) until RoPE",
    "softmax_precision": "keep q k^T, the max, exp and the sum in float32, subtracting the row max",
    "accumulation_precision": "multiply probabilities by values and accumulate in float32",
    "output_projection": "compute o_proj in float32 (or the input's dtype)",
}
# where each tensor is made: a way recomputes from the earliest of its tensors' steps, reusing the others
STEP_OF = {"proj_in": 0, "projection": 0, "positions": 1, "inv_freq": 1, "angles": 1, "tables": 1, "qk": 2,
           "scores": 3, "shift": 3, "exp": 3, "exp_unshifted": 3, "sum": 3, "probs": 4,
           "values": 4, "accumulator": 4, "context": 4, "o_in": 5, "output": 5,
           **{f"running_sum{b}": 3 for b in BLOCKS}}  # fmt: skip


def dtype_name(to: torch.dtype) -> str:
    return str(to).removeprefix("torch.")


def _rounder(points: frozenset, to: torch.dtype | None):
    def r(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(to).to(t.dtype) if name in points else t

    return r


# ---------------------------------------------------------------------------------------------------------
# the pipeline in float64, some tensors rounded


def softmax(s, allowed, points: frozenset, r, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """masks.masked_softmax in float64, the tensors named in points rounded (exp_unshifted: exp(s), no max); sinks
    [H]: one more logit per head in the denominator (a column joined to the keys, dropped after)."""
    if sinks is not None:
        col = sinks.to(s.dtype).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)  # (B, H, Sq, 1)
        s = torch.cat((s, col), dim=-1)
        allowed = torch.cat((allowed.expand(*col.shape[:-1], allowed.shape[-1]),
                             torch.ones_like(col, dtype=torch.bool)), dim=-1)  # fmt: skip
        return softmax(s, allowed, points, r)[..., :-1]
    s = s.masked_fill(~allowed, float("-inf"))
    if "exp_unshifted" in points:
        e = r("exp_unshifted", torch.exp(s))  # inf where it overflows: NaN probabilities, as the code gets
    else:
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # (B, H, Sq, 1)
        e = r("exp", torch.exp(r("shift", s - m)))  # (B, H, Sq, Sk), 0 where masked
    online = [b for b in BLOCKS if f"running_sum{b}" in points]
    z = online_sum(s, online[0], r) if online else r("sum", e.sum(dim=-1, keepdim=True))
    return r("probs", e / torch.where(z > 0, z, torch.ones_like(z)))


def online_sum(s, block: int, r) -> torch.Tensor:
    """The row sum of exp(s - max) as an online softmax keeps it: over key blocks, l = l exp(m - m') + sum exp(s -
    m') with m' the running max, rounded (r) after each block; -> (B, H, Sq, 1) in the final max's frame."""
    m = torch.full_like(s[..., :1], float("-inf"))
    z = torch.zeros_like(m)
    for j in range(0, s.shape[-1], block):
        blk = s[..., j : j + block]
        m_new = torch.maximum(m, blk.amax(-1, keepdim=True))
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        z = r(f"running_sum{block}", z * torch.exp(m - safe) + torch.exp(blk - safe).sum(-1, keepdim=True))
        m = m_new
    return z


def aggregate(p, v, points: frozenset, r) -> torch.Tensor:
    p, v = r("probs", p), r("values", v)
    if "accumulator" not in points:
        return r("context", p @ v)  # (B, H, Sq, d)
    acc = torch.zeros(*p.shape[:-1], v.shape[-1], dtype=p.dtype)
    for j in range(0, v.shape[-2], BLOCK):
        acc = r("accumulator", acc + p[..., j : j + BLOCK] @ v[..., j : j + BLOCK, :])
    return r("context", acc)


@dataclass
class Case:
    """One scenario in float64: the kernel's part (q, k, v after RoPE -> context), and the layer's around it when x
    is given. The unrounded intermediates are kept, so a way recomputes only from its first rounded tensor on."""

    allowed: torch.Tensor  # (B|1, 1, Sq, Sk)
    scale: float
    qkv: tuple | None = None  # a kernel's q (B, H, Sq, d), k, v (B, Hkv, Sk, d) float64; None for a layer
    config: dict | None = None
    w: dict | None = None  # a layer's float64 weights, o_proj's rows cut to the compared channels
    x: torch.Tensor | None = None  # (B, S, D) float64
    pos: torch.Tensor | None = None
    softcap: float = 0.0  # scores capped, softcap tanh(s / softcap), after the scale (Gemma 2)
    sinks: torch.Tensor | None = None  # [H] float64 (GPT-OSS)
    clean: dict = field(default_factory=dict)

    def run(self, points: frozenset, to: torch.dtype | None, tables: tuple | None = None) -> torch.Tensor:
        """The output (a layer's compared channels, or a kernel's context) with `points` rounded to `to`; with
        `tables` (cos, sin) instead of the config's RoPE tables, when given."""
        first = min((STEP_OF[p] for p in points), default=len(STEP_OF))
        first = min(first, 1) if tables is not None else first
        rounded, exact = _rounder(points, to), _rounder(frozenset(), None)

        def step(i: int, key: str, fn):
            """fn(r, points) again when a tensor made at step i or before is rounded; else its clean value."""
            if first <= i:
                return fn(rounded, points)
            if key not in self.clean:
                self.clean[key] = fn(exact, frozenset())
            return self.clean[key]

        if self.x is None:
            q, k, v = self.qkv
        else:
            qkv = step(0, "qkv", lambda r, _: self._project(r))
            tables = tables if tables is not None else step(1, "tables", lambda r, _: self._rope(r))
            q, k, v = step(1, "rotated", lambda r, _: (apply_half(qkv[0], *tables), apply_half(qkv[1], *tables),
                                                        qkv[2]))  # fmt: skip
        g = q.shape[1] // k.shape[1]
        k, v = step(1, "kv", lambda r, _: (repeat_kv(k, g), repeat_kv(v, g)))  # (B, H, Sk, d)
        s = step(2, "s", lambda r, _: self._cap((r("qk", q) @ r("qk", k).transpose(-2, -1)) * self.scale))
        p = step(3, "p", lambda r, pts: softmax(r("scores", s), self.allowed, pts, r, self.sinks))  # (B, H, Sq, Sk)
        ctx = step(4, "ctx", lambda r, pts: aggregate(p, v, pts, r))  # (B, H, Sq, d)
        if self.x is None:
            return ctx
        out = merge_heads(ctx) @ rounded("o_in", self.w["o_proj"]).T  # (B, S, channels)
        b = self.w.get("o_proj.bias")
        return rounded("output", out if b is None else out + b)

    def _cap(self, s):
        return self.softcap * torch.tanh(s / self.softcap) if self.softcap else s

    def _project(self, r):
        h, w = heads(self.config), self.w
        x = r("proj_in", self.x)

        def one(n, n_heads):  # x W^T (+ b), heads split; the family's q/k RMSNorm per head
            y = x @ r("proj_in", w[n]).T
            y = y if w.get(f"{n}.bias") is None else y + w[f"{n}.bias"]
            return r("projection", split_heads(y, n_heads, h.d))  # (B, n, S, d)

        q, k, v = one("q_proj", h.H), one("k_proj", h.Hkv), one("v_proj", h.Hkv)
        q = q if w.get("q_norm") is None else rms_norm(q, w["q_norm"], self.config)
        k = k if w.get("k_norm") is None else rms_norm(k, w["k_norm"], self.config)
        return q, k, v

    def _rope(self, r):
        seq = int(self.pos.max()) + 1 if self.pos.numel() else None
        inv, scaling = inv_freq(self.config, seq_len=seq, dtype=torch.float64)
        ang = r("angles", r("positions", self.pos[..., None].double()) * r("inv_freq", inv))  # (B, S, rd/2)
        emb = torch.cat((ang, ang), dim=-1)
        return r("tables", emb.cos() * scaling), r("tables", emb.sin() * scaling)

    def scores(self) -> torch.Tensor:
        """The unrounded scores (B, H, Sq, Sk)."""
        self.run(frozenset(), None)
        return self.clean["s"]


def layer_case(config: dict, w: dict, x, pos, mask) -> Case:
    """A layer scenario; its output compared on at most CHANNELS channels (channels())."""
    S, D = x.shape[1], x.shape[-1]
    w64 = {n: t.double() for n, t in w.items()}
    w64["o_proj"] = w64["o_proj"][channels(D)]
    if "o_proj.bias" in w64:
        w64["o_proj.bias"] = w64["o_proj.bias"][channels(D)]
    kw = keywords(config, w64)  # the family's window, scale, softcap, sinks
    allowed = masks.build(S, S, mask)
    if "window" in kw:
        allowed = allowed & masks.window_mask(S, S, kw["window"])
    return Case(allowed, kw.get("scale", heads(config).d ** -0.5), None, config, w64, x.double(), pos,
                kw.get("softcap", 0.0), kw.get("sinks"))  # fmt: skip


def kernel_case(q, k, v, causal: bool, scale: float | None, mask) -> Case:
    allowed = masks.build(q.shape[2], k.shape[2], mask, is_causal=causal)
    return Case(allowed, q.shape[-1] ** -0.5 if scale is None else scale, (q.double(), k.double(), v.double()))


def channels(D: int) -> torch.Tensor:
    return torch.arange(0, D, max(1, D // CHANNELS))


# ---------------------------------------------------------------------------------------------------------
# the fit


@dataclass
class Match:
    stage: str
    to: torch.dtype
    way: str  # the way of lowering that carries the most of the fit
    r2: float

    @property
    def hint(self) -> str:
        return (f"the error matches {WAYS[self.way][2]} computed in {dtype_name(self.to)} (that rounding explains "
                f"{self.r2:.0%} of it): {FIX[self.stage]}")  # fmt: skip

    @property
    def name(self) -> str:
        return f"signature:{self.way}/{dtype_name(self.to)}"


def signatures(case: Case, keep: torch.Tensor, ways) -> dict:
    """(way, dtype) -> the error that way leaves (against the case's own unrounded run), over the compared elements
    (keep: a bool mask shaped like the output)."""
    exact = case.run(frozenset(), None)
    Sk = case.allowed.shape[-1]
    same = {f"running_sum{b}": "sum" for b in BLOCKS if b >= Sk}  # one block: the same tensors rounded
    if Sk <= BLOCK:
        same |= {"accumulator": "context", "accumulator_computed": "pv_computed"}
    out = {}
    for w in sorted(ways, key=lambda w: w in same):  # the ways that others repeat first
        for to in LOW:
            key = (same[w], to) if w in same and same[w] in ways else None
            out[(w, to)] = out[key] if key else (case.run(WAYS[w][1], to) - exact)[keep]
    return out


def layer_signature(config: dict, w: dict, runs: dict[str, Run], names: list[str]) -> Diagnosis | None:
    """The stage whose rounding a layer's error matches, on the float32 scenarios among `names` (the shortest few
    whose outputs are finite)."""
    usable = [n for n in names if runs[n].dtype == torch.float32 and runs[n].x.shape[1] <= MAX_SUSPECT_LEN
              and runs[n].ref64 is not None and bool(torch.isfinite(runs[n].out[runs[n].keep]).all())]  # fmt: skip
    observed, sims = [], []
    for n in sorted(usable, key=lambda n: runs[n].x.shape[:2].numel())[:SCENARIOS]:
        r = runs[n]
        ch = channels(r.out.shape[-1])
        keep = r.keep[..., None].expand(*r.keep.shape, len(ch))  # (B, S, channels)
        observed.append((r.out[..., ch].double() - r.ref64[..., ch].double())[keep])
        sims.append(signatures(layer_case(config, w, r.x, r.pos, r.mask), keep, WAYS))
        if len(observed) == 1 and explain(observed, sims) is None:
            return None  # no rounding explains the shortest scenario: the error is no precision loss
    found = explain(observed, sims) if observed else None
    return None if found is None else Diagnosis(found.stage, found.hint, found.name)


def explain(observed: list[torch.Tensor], sims: list[dict]) -> Match | None:
    """observed: per scenario, the implementation's error (out - ref64) over its compared elements; sims: per
    scenario, signatures(). The (stage, dtype) whose ways explain the largest share of the error, if at least
    MIN_R2."""
    norms = [float(o.double().norm()) for o in observed]
    if not all(n > 0 and math.isfinite(n) for n in norms):
        return None
    e = torch.cat([o.double() / n for o, n in zip(observed, norms, strict=True)])
    cols = {}
    for key in sims[0]:
        col = torch.cat([s[key] / n for s, n in zip(sims, norms, strict=True)])
        if torch.isfinite(col).all() and float(col.norm()) > 1e-6:  # a rounding that overflows explains nothing
            cols[key] = col
    best = None
    for stage in dict.fromkeys(st for st, _, _ in WAYS.values()):
        for to in LOW:
            keys = [key for key in cols if key[1] == to and WAYS[key[0]][0] == stage]
            if not keys:
                continue
            r2, coef = _nnls_r2(torch.stack([cols[key] for key in keys], 1), e)
            if best is None or r2 > best.r2:
                top = max(range(len(keys)), key=lambda i: coef[i] * float(cols[keys[i]].norm()))
                best = Match(stage, to, keys[top][0], r2)
    return best if best is not None and best.r2 >= MIN_R2 else None


def _nnls_r2(E: torch.Tensor, e: torch.Tensor) -> tuple[float, list[float]]:
    """min |E a - e| with a >= 0 (Lawson and Hanson's active set, on unit columns: a handful of them, some nearly
    parallel) -> (R^2, a)."""
    scale = E.norm(dim=0)
    U = E / scale
    a = torch.zeros(E.shape[1], dtype=E.dtype)
    free: list[int] = []
    for _ in range(3 * E.shape[1]):
        grad = U.T @ (e - U @ a)
        grad[free] = -float("inf")
        j = int(grad.argmax())
        if float(grad[j]) <= 1e-12 * float(e.norm()):
            break
        free.append(j)
        while free:
            sol = torch.zeros_like(a)
            sol[free] = torch.linalg.lstsq(U[:, free], e[:, None]).solution[:, 0]
            if bool((sol[free] > 0).all()):
                a = sol
                break
            neg = [i for i in free if sol[i] <= 0]
            step = min(float(a[i] / (a[i] - sol[i])) for i in neg)
            a = a + step * (sol - a)
            free = [i for i in free if float(a[i]) > 1e-12]
    resid = e - U @ a
    return 1 - float(resid @ resid) / float(e @ e), (a / scale).tolist()


# ---------------------------------------------------------------------------------------------------------
# rows that overflowed

OVERFLOW = {torch.float16: math.log(torch.finfo(torch.float16).max), torch.float32: math.log(torch.finfo().max)}
BORDER = 0.05  # rows whose largest score is this close to the limit may go either way


def overflow_dtype(scores: torch.Tensor, allowed: torch.Tensor, bad: torch.Tensor, keep: torch.Tensor
                   ) -> torch.dtype | None:  # fmt: skip
    """scores (B, H, S, S) float64; bad, keep (B, S): the broken rows (non-finite or zero), the compared rows. The
    dtype whose unshifted exp overflows on just those rows (some allowed score past log(max) in some head)."""
    top = scores.masked_fill(~allowed, float("-inf")).amax(dim=(1, 3))  # (B, S) the largest allowed score per row
    for to, limit in OVERFLOW.items():
        sure = keep & ((top - limit).abs() > BORDER)
        if bool((bad & keep).any()) and torch.equal((top > limit) & sure, bad & sure):
            return to
    return None
