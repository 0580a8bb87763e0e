"""Kernels (`--core`): the attention between the projections and o_proj, verified on a scenario matrix in the
manner of FlashAttention's own tests, and diagnosed in kernel terms.

    scenarios   Sq = Sk, Sq = 1 (decoding), Sq < Sk (chunked prefill); causal and not; head_dim 32 .. 256;
                MHA, GQA, MQA; lengths off every block multiple; padding; scores in the thousands; a given scale;
                float32, bfloat16, float16
    reference   transformers' eager_attention_forward in the scenario's dtype, and its sdpa_attention_forward in
                float64 (eager's softmax is float32 whatever the input); lse as float64 logsumexp
    compare     the same tolerance policy as layers (compare.py), on out [B, Sq, H*d] over rows that see a key;
                lse, when returned, within LSE_TOL of float64
    diagnose    suspects (the catalog's kernel bugs, a fitted scale), a GQA-mapping probe, the pattern of
                failing scenarios (Sq < Sk only: causal alignment; non-causal only: the causal flag; ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.bugs import catalog, pipeline
from harness.verify.diagnose import Diagnosis, _maxdiff, _rms, precision_steps

LSE_TOL = 1e-3  # float32, natural-log units: 0.1% on every probability; float32 kernels land near 1e-6
# half precision: the FlashAttention rule, 2x the error of HF's own scores (matmul in the dtype, logsumexp in
# float32, as its eager path computes them) against float64, plus LSE_TOL


@dataclass(frozen=True)
class KernelScenario:
    name: str
    isolates: str
    B: int = 1
    H: int = 8
    Hkv: int = 2
    Sq: int = 17
    Sk: int = 17
    d: int = 64
    causal: bool = True
    dtype: torch.dtype = torch.float32
    pads: tuple[int, ...] | None = None  # left padding per batch row (keys); B = len(pads)
    scale: float | None = None
    mult: float = 1.0  # q and k multiplied by this: scores grow by its square
    quick: bool = True
    seed: int = 0

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        B = len(self.pads) if self.pads else self.B
        q = torch.randn(B, self.H, self.Sq, self.d, generator=g) * self.mult
        k = torch.randn(B, self.Hkv, self.Sk, self.d, generator=g) * self.mult
        v = torch.randn(B, self.Hkv, self.Sk, self.d, generator=g)
        mask = None
        if self.pads:
            mask = torch.ones(B, self.Sk, dtype=torch.long)
            for b, p in enumerate(self.pads):
                mask[b, :p] = 0
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), mask


S = KernelScenario
SCENARIOS = [
    S("one_token", "a single key: out = v of the query head's KV head", Sq=1, Sk=1),
    S("prefill_17", "GQA g=4, a length off every block", B=2),
    S("mha_113_d32", "MHA, head_dim 32", H=4, Hkv=4, Sq=113, Sk=113, d=32),
    S("mqa_257_d128", "MQA, head_dim 128, one past a block", H=4, Hkv=1, Sq=257, Sk=257, d=128, quick=False),
    S("gqa_1000_d96", "GQA, head_dim 96 (not a power of two)", H=6, Hkv=2, Sq=1000, Sk=1000, d=96, quick=False),
    S("long_2048", "float32 accumulation over 2048 keys", H=2, Hkv=1, Sq=2048, Sk=2048, quick=False),
    S("long_4099", "a long length off every block", H=1, Hkv=1, Sq=4099, Sk=4099, quick=False),
    S("d256", "head_dim 256", H=2, Hkv=1, Sq=64, Sk=64, d=256),
    S("decode_1", "decoding: one query, bottom-right causal (it sees every key)", Sq=1, Sk=300),
    S("chunk_17_of_300", "chunked prefill: Sq < Sk, bottom-right causal", Sq=17, Sk=300),
    S("noncausal", "causal=False: every key", Sq=113, Sk=113, causal=False),
    S("noncausal_chunk", "causal=False with Sq < Sk", Sq=17, Sk=200, causal=False),
    S("padding", "left padding of the keys; a row with one real key", Sq=64, Sk=64, pads=(0, 12, 63)),
    S("scale_0.3", "a given scale instead of 1/sqrt(d)", Sq=64, Sk=64, scale=0.3),
    S("scores_x25", "scores in the thousands: the running max", Sq=128, Sk=128, mult=25.0, quick=False),
    S("bfloat16", "bf16 inputs, float32 softmax and accumulation", Sq=128, Sk=128, dtype=torch.bfloat16),
    S("bf16_decode", "bf16, Sq < Sk", Sq=1, Sk=257, dtype=torch.bfloat16, quick=False),
    S("float16", "fp16 inputs", Sq=128, Sk=128, dtype=torch.float16, quick=False),
]
BY_NAME = {s.name: s for s in SCENARIOS}
# The Triton interpreter runs a kernel in Python: on a CPU it gets the quick set plus these (chosen by measured
# interpreter time: every kind of case, no length above 257).
INTERPRETER_EXTRA = {"mqa_257_d128", "scores_x25", "float16", "bf16_decode"}


def select(dtypes: set, quick: bool, slow_kernel: bool = False) -> list[KernelScenario]:
    out = []
    for s in SCENARIOS:
        if s.dtype not in dtypes:
            continue
        if quick and not s.quick:
            continue
        if slow_kernel and not (s.quick or s.name in INTERPRETER_EXTRA):
            continue
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------
# reference


def allowed(s: KernelScenario, mask) -> torch.Tensor:
    """(B|1, 1, Sq, Sk) bool, written here from the contract (not from impl/)."""
    i = torch.arange(s.Sq)[:, None] + (s.Sk - s.Sq)
    keep = (torch.arange(s.Sk)[None, :] <= i) if s.causal else torch.ones(s.Sq, s.Sk, dtype=torch.bool)
    keep = keep[None, None]
    if mask is not None:
        keep = keep & mask.bool()[:, None, None, :]
    return keep


def _module(H: int, Hkv: int):
    m = torch.nn.Module()
    m.num_key_value_groups, m.training, m.is_causal = H // Hkv, False, False
    return m


@dataclass
class KernelCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    ref: torch.Tensor  # (B, H, Sq, d), the scenario's dtype
    ref64: torch.Tensor  # (B, H, Sq, d), float64
    lse64: torch.Tensor  # (B, H, Sq)
    keep: torch.Tensor  # (B, Sq) rows that see at least one key
    lse_tol: float


def reference(s: KernelScenario, cache: dict) -> KernelCase:
    if s.name in cache:
        return cache[s.name]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v, mask = s.build()
    keep4 = allowed(s, mask).expand(q.shape[0], 1, s.Sq, s.Sk)
    scale = s.d**-0.5 if s.scale is None else s.scale
    m = _module(s.H, s.Hkv)

    def additive(dtype):
        return torch.zeros(keep4.shape, dtype=dtype).masked_fill(~keep4, torch.finfo(dtype).min)

    with torch.no_grad():
        ref = eager_attention_forward(m, q, k, v, additive(q.dtype), scaling=scale)[0].transpose(1, 2)
        q64, k64, v64 = q.double(), k.double(), v.double()
        ref64 = sdpa_attention_forward(m, q64, k64, v64, additive(torch.float64), scaling=scale)[0].transpose(1, 2)
        sc = (q64 @ k64.repeat_interleave(s.H // s.Hkv, 1).transpose(-2, -1)) * scale
        lse64 = torch.logsumexp(sc.masked_fill(~keep4, float("-inf")), dim=-1)  # (B, H, Sq)
        hf = (q @ k.repeat_interleave(s.H // s.Hkv, 1).transpose(-2, -1)).float() * scale  # HF's scores
        lse_hf = torch.logsumexp(hf.masked_fill(~keep4, float("-inf")), dim=-1)
    rows = keep4[:, 0].any(-1)  # (B, Sq)
    tol = LSE_TOL
    if s.dtype != torch.float32:
        tol += 2 * _maxdiff(lse_hf, lse64, rows[:, None, :].expand_as(lse64))
    case = KernelCase(q, k, v, mask, ref.contiguous(), ref64.contiguous(), lse64, rows, tol)
    cache[s.name] = case
    return case


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """(B, H, Sq, d) -> (B, Sq, H*d): the layout compare() reads, one row per query."""
    B, H, Sq, d = t.shape
    return t.transpose(1, 2).reshape(B, Sq, H * d)  # (B, Sq, H*d)


def lse_error(lse: torch.Tensor, c: KernelCase) -> float:
    keep = c.keep[:, None, :].expand_as(lse)
    return _maxdiff(lse, c.lse64, keep)


# ---------------------------------------------------------------------------------------------------------
# diagnosis


@dataclass
class KernelRun:
    s: KernelScenario
    c: KernelCase
    out: torch.Tensor
    lse_err: float | None  # None: no lse returned (or it failed the out check first)


def diagnose_kernel(runs: dict[str, KernelRun], failing: list[str], passing: list[str], call) -> Diagnosis:
    """failing/passing: scenario names whose out failed (lse failures are separate: 'name:lse')."""
    out_fail = [n for n in failing if not n.endswith(":lse")]
    lse_fail = [n[:-4] for n in failing if n.endswith(":lse")]
    if not out_fail and lse_fail:
        return Diagnosis("lse", f"out matches but lse is off (by {max(runs[n].lse_err for n in lse_fail):.2e}): lse "
                         "must be the natural log of the row sum of exp(scale q k^T) over the allowed keys, "
                         "m + log(l), float32", "lse")  # fmt: skip
    bad = [n for n in out_fail if not torch.isfinite(runs[n].out[rows_keep(runs[n])]).all()]
    if bad:
        if set(bad) <= {"scores_x25"}:
            return Diagnosis("softmax", "NaN/Inf only when scores are in the thousands: exp overflows; subtract "
                             "the running max before exp", "overflow")  # fmt: skip
        return Diagnosis("nonfinite", f"NaN/Inf in rows that see keys (scenarios: {', '.join(bad)})")
    fp32 = [n for n in out_fail if runs[n].s.dtype == torch.float32 and runs[n].s.Sq * runs[n].s.Sk <= 300 * 300]
    if fp32:
        best = None
        found = [(b.name, b.stage, b.hint, b.kernel()) for b in catalog.kernel_suspects()]
        found += [(n, st, h, pipeline.core(**steps)) for n, st, h, steps in precision_steps()
                  if set(steps) <= pipeline.KERNEL_STEPS]  # fmt: skip
        for name, stage, hint, fn in found:
            worst = _match(fn, runs, fp32)
            if worst is not None and (best is None or worst < 0.99 * best[3]):
                best = (name, stage, hint, worst)
        if best is not None:
            return Diagnosis(best[1], best[2], best[0])
        found = _scale_fit(runs, fp32)
        if found is not None:
            return found
    if "one_token" in out_fail and call is not None:
        try:
            found = _head_mapping(call)
        except Exception:  # noqa: BLE001 - a probe the kernel cannot answer decides nothing
            found = None
        if found is not None:
            return found
    return _pattern(set(out_fail), set(passing), runs)


def diagnose_precision(runs: dict[str, KernelRun], imprecise: list[str]) -> Diagnosis:
    """A kernel that passes but is far less precise: which of its steps, lowered to bf16 or fp16, it matches."""
    names = [n for n in imprecise if runs[n].s.dtype == torch.float32 and runs[n].s.Sq * runs[n].s.Sk <= 300 * 300]
    best = None
    for name, stage, hint, steps in precision_steps():
        if not set(steps) <= pipeline.KERNEL_STEPS or not names:
            continue
        worst = _match(pipeline.core(**steps), runs, names)
        if worst is not None and (best is None or worst < 0.99 * best[3]):
            best = (name, stage, hint, worst)
    if best is not None:
        return Diagnosis(best[1], best[2], best[0])
    return Diagnosis("unknown", "no single step explains the lost precision: " + ", ".join(sorted(imprecise)))


def rows_keep(r: KernelRun) -> torch.Tensor:
    return r.c.keep[:, None, :, None].expand_as(r.out)


def _match(fn, runs, names) -> float | None:
    worst = 0.0
    for n in names:
        r = runs[n]
        try:
            with torch.no_grad():
                sus = fn(r.c.q.double(), r.c.k.double(), r.c.v.double(), causal=r.s.causal, scale=r.s.scale,
                         attention_mask=r.c.mask)  # fmt: skip
            sus = sus[0] if isinstance(sus, tuple) else sus
        except Exception:  # noqa: BLE001
            return None
        keep = rows_keep(r)  # the same criterion as a layer's suspects (diagnose._match)
        got, base = _rms(r.out, sus, keep), _rms(r.out, r.c.ref, keep)
        if not got <= 0.3 * base + 2 * _rms(r.c.ref, r.c.ref64, keep):
            return None
        worst = max(worst, got / max(base, 1e-30))
    return worst


def _scale_fit(runs, names) -> Diagnosis | None:
    probe = max(names, key=lambda n: runs[n].s.Sk > 1)
    r = runs[probe]
    if r.s.Sk == 1:
        return None
    d = r.s.d
    base = d**-0.5 if r.s.scale is None else r.s.scale

    def fn_for(a):
        return lambda q, k, v, *, causal, scale, attention_mask: pipeline.core()(
            q, k, v, causal=causal, scale=(d**-0.5 if scale is None else scale) * a, attention_mask=attention_mask)

    def resid(t):
        return _match_err(fn_for(2.0**t), r)

    grid = [i / 4 for i in range(-32, 33)]
    errs = [resid(t) for t in grid]
    i = min(range(len(grid)), key=errs.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(20):
        m1, m2 = hi - (hi - lo) / 1.618, lo + (hi - lo) / 1.618
        lo, hi = (lo, m2) if resid(m1) < resid(m2) else (m1, hi)
    a = 2.0 ** ((lo + hi) / 2)
    if abs(a - 1) < 1e-3 or _match(fn_for(a), runs, names) is None:
        return None
    return Diagnosis("scale", f"scores look multiplied by {a:.4g}x the expected scale ({base:.4g} on {probe}): "
                     "use scale if given, else 1/sqrt(head_dim)", "scale_fit")  # fmt: skip


def _match_err(fn, r: KernelRun) -> float:
    with torch.no_grad():
        sus = fn(r.c.q.double(), r.c.k.double(), r.c.v.double(), causal=r.s.causal, scale=r.s.scale,
                 attention_mask=r.c.mask)  # fmt: skip
    return _maxdiff(r.out, sus, rows_keep(r))


def _head_mapping(call) -> Diagnosis | None:
    """One key: query head h's output is the value of its KV head. v of KV head j = j + 1 reads the map off."""
    H, Hkv, d = 8, 2, 64
    q, k = torch.zeros(1, H, 1, d), torch.zeros(1, Hkv, 1, d)
    v = (torch.arange(Hkv, dtype=torch.float32) + 1)[None, :, None, None].expand(1, Hkv, 1, d).contiguous()
    out, _ = call(q, k, v, causal=True, scale=None, mask=None)
    got = out[0, :, 0, 0].double()
    used = torch.round(got) - 1
    if (got - (used + 1)).abs().max() > 1e-3:
        return None
    want = [h // (H // Hkv) for h in range(H)]
    if [int(u) for u in used] == want:
        return None
    shown = ", ".join(f"{h}->{int(u)}" for h, u in enumerate(used))
    return Diagnosis("gqa", f"query heads read KV heads {shown} (8 query heads, 2 KV heads); expected h -> h // g "
                     "(KV head j serves query heads j*g..j*g+g-1)", "probe:head_mapping")  # fmt: skip


def _pattern(f: set, p: set, runs) -> Diagnosis:
    shifted = {n for n, r in runs.items() if r.s.Sq < r.s.Sk and r.s.causal}
    if f and f <= shifted and p & {"prefill_17", "noncausal", "padding"}:
        return Diagnosis("causal_mask", "only causal cases with fewer queries than keys fail: the causal mask is "
                         "aligned top-left; the queries are the last Sq of Sk keys (query i sees keys up to "
                         "Sk - Sq + i)", "bottom_right")  # fmt: skip
    noncausal = {n for n, r in runs.items() if not r.s.causal}
    if f and f <= noncausal:
        return Diagnosis("causal_mask", "only causal=False cases fail: the causal flag is not honoured",
                         "causal_flag")
    if f == {"padding"}:
        return Diagnosis("padding_mask", "only the padded batch fails: mask keys where attention_mask is 0 "
                         "(1 = key, 0 = padding)", "padding")
    if f and all(runs[n].s.scale is not None for n in f):
        return Diagnosis("scale", "only a given scale fails: use scale when it is not None", "scale_arg")
    if f <= {"scores_x25"} and f:
        return Diagnosis("softmax", "only scores in the thousands fail: subtract the running max; rescale the "
                         "accumulator when it changes", "scores_x25")
    fl = {runs[n].s.Sk for n in f if runs[n].s.dtype == torch.float32}
    pl = {runs[n].s.Sk for n in p if runs[n].s.dtype == torch.float32}
    if fl and pl and min(fl) > max(pl):
        return Diagnosis("tiling", f"every float32 case with {min(fl)} keys or more fails and every shorter one "
                         "passes: a block effect (the rescaling across key blocks, the last partial block, the "
                         "diagonal block's mask)", "length")  # fmt: skip
    if f and all(runs[n].s.dtype != torch.float32 for n in f):
        return Diagnosis("softmax", "only half precision fails: keep the softmax and the accumulator in float32",
                         "half")
    return Diagnosis("unknown", "no single stage explains the failures: " + ", ".join(sorted(f)))
