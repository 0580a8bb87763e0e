"""Where a ring kernel goes wrong: probes run on its ranks that read back the whole attention pattern.

The probe: q = sqrt(d) e_0, key t = a_t e_0, value t = e_t (d >= S). With the default scale every score is a_t, so
query p's output IS its row of attention weights: out[p, t] = exp(a_t) / sum over visible t' of exp(a_t'), zero for
a key it must not see. a_t grows by chunk, so every block has its own max (an unrescaled merge shows), and the
pattern tells, for each query rank i and each key block j (the tokens rank j holds), which keys were seen and with
what weight: which ranks' outputs a rank's keys move, and by how much.

    a block seen with the wrong keys inside it          ring_mask    (a mask from the wrong positions: diagonal vs
                                                                      remote, zigzag's two chunks)
    blocks swapped (each seen as another's), or a       ring_order   (the wrong neighbour; the own block skipped;
      whole block missing, or counted twice                           counted twice)
    the right keys with the wrong weights: rows not     ring_merge   (no rescaling to the new max, normalised outputs
      summing to 1, a block scaled by a constant                      summed, the lse's base)
    a returned lse off where the output is right        ring_merge
    weights off by a power of exp(a_t) (every key)      scale
Where the probe shows nothing, the failing scenarios' names say what differs (bfloat16, GQA, the scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from harness.verify import kernel_hf, ring_cases
from harness.verify.diagnosis.evidence import Diagnosis
from harness.verify.worker import Fault

SEEN = 1e-6  # a weight above this was seen: far below the probe's smallest weight (SPREAD keeps it so)
TOL = 1e-4  # weights of order 1/S, in float32: a hundred times their rounding
SPREAD = 5.25  # the score's rise over the 2W chunks: the first chunk's weights exp(-SPREAD) of the last's
GROSS = 0.05  # a gradient this far off (a share of its scale) is a wrong sum, far beyond bfloat16's rounding


@dataclass
class RingRun:
    case: ring_cases.RingCase
    ref: ring_cases.RingRef
    out: torch.Tensor
    lse_err: float | None
    comm: list[dict]


Run = Callable[..., object]  # (case, parts, causal=, scale=) -> RingGot (contracts/ring.py)


def probe_case(c: ring_cases.RingCase) -> ring_cases.RingCase:
    """8W tokens; head_dim the power of two that holds a channel per key and one per KV head."""
    S = 8 * c.W
    d = max(16, 1 << (S + c.s.Hkv - 1).bit_length())
    s = ring_cases.RingScenario("probe", S, causal=c.causal, B=1, H=c.s.H, Hkv=c.s.Hkv, d=d)
    return replace(c, s=s)


def probe_inputs(c: ring_cases.RingCase) -> tuple[list[dict], torch.Tensor]:
    """The ranks' shards, and a (S,) the scores. Value t of KV head j is e_t + e_(S + j): channel S + j of a query
    head's output says which KV head it read."""
    s = c.s
    S, d, n = s.S, s.d, s.S // (2 * c.W)
    t = torch.arange(S)
    step = min(0.75, SPREAD / (2 * c.W - 1))  # every block its own max
    a = step * (t // n) + 0.05 * step * (t % n)  # (S,)
    q = torch.zeros(1, s.H, S, d)
    q[..., 0] = math.sqrt(d)  # with scale 1/sqrt(d), score = a_t
    k = torch.zeros(1, s.Hkv, S, d)
    k[..., 0] = a
    v = torch.eye(S, d).expand(1, s.Hkv, S, d).clone()  # (1, Hkv, S, d): value t = e_t
    for j in range(s.Hkv):
        v[0, j, :, S + j] = 1.0
    parts = [ring_cases.shard(x, c.W, c.layout) for x in (q, k, v)]
    return [{"q": x, "k": y, "v": z} for x, y, z in zip(*parts, strict=True)], a


def expected(a: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S) the attention weights, and (S,) the lse, in float64."""
    S = len(a)
    keep = torch.ones(S, S, dtype=torch.bool)
    if causal:
        keep = torch.tril(keep)
    s = a.double()[None, :].expand(S, S).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1), torch.logsumexp(s, -1)


def diagnose_ring(runs: dict, failing: list[str], passing: list[str], run: Run) -> Diagnosis:
    forward = [n for n in failing if ":" not in n]
    only_lse = [n.split(":")[0] for n in failing if n.endswith(":lse")]
    names = forward or only_lse
    names = [n for n in names if n in runs]
    if not names:
        return Diagnosis("unknown", "no output to diagnose (every failing case raised): see the verdict's error")
    pick = sorted(names, key=lambda n: (runs[n].case.dtype != torch.float32, "padded" in n))[0]
    d = misplaced(runs[pick])
    if d is not None:
        return d
    c = probe_case(runs[pick].case)
    parts, a = probe_inputs(c)
    try:
        got = run(c, parts, causal=c.causal, scale=None, doing="running the rank probe")
    except Fault as e:
        return Diagnosis("unknown", f"the rank probe ({c.W} ranks, {c.layout}) faulted: {e.message}")
    P = got.out[0, 0, :, : c.s.S].double()  # (S, S): query p's weights over keys t
    want, lse = expected(a, c.causal)
    where = f"(probe: {c.W} ranks, {c.layout}, {'causal' if c.causal else 'not causal'}, S={c.s.S})"
    d = heads(got.out[0], c) or pattern(P, want, c) or weights(P, want, c, a)
    if d is not None:
        return Diagnosis(d.stage, f"{d.hint} {where}", d.matched)
    if got.lse is not None and (err := float((got.lse[0, 0].double() - lse).abs().max())) > 1e-3:
        base2 = float((got.lse[0, 0].double() - lse / math.log(2)).abs().max()) < 1e-3
        why = "it is in base 2 (log2), not the natural log" if base2 else f"off by up to {err:.3g}"
        return Diagnosis("ring_merge", f"the output is right but the returned lse is not the log-sum-exp of each "
                         f"row: {why} {where}", "probe:lse")  # fmt: skip
    return by_scenarios(forward, only_lse, runs, where)


def heads(out: torch.Tensor, c) -> Diagnosis | None:
    """Which KV head each query head read (its output's marker channels): KV head j serves heads j*g .. j*g+g-1."""
    S, Hkv, H = c.s.S, c.s.Hkv, c.s.H
    mass = torch.nan_to_num(out[:, :, S : S + Hkv].double()).abs().mean(1)  # (H, Hkv)
    read = mass.argmax(-1).tolist()
    wrong = [(h, j) for h, j in enumerate(read) if j != h // (H // Hkv) and float(mass[h].max()) > SEEN]
    if not wrong:
        return None
    h, j = wrong[0]
    return Diagnosis("gqa", f"query head {h} reads KV head {j}, not {h // (H // Hkv)} ({len(wrong)} of {H} heads "
                     f"wrong): with {H} query heads on {Hkv} KV heads, KV head j serves heads j*{H // Hkv} .. "
                     f"j*{H // Hkv}+{H // Hkv - 1}", "probe:heads")  # fmt: skip


def misplaced(run: RingRun) -> Diagnosis | None:
    """Outputs right but in the wrong place: a chunk of tokens whose output is transformers' output of another
    chunk (a rank returning another's shard, zigzag's halves swapped)."""
    c, ref = run.case, run.ref.ref64
    if c.padded != c.s.S:
        return None
    n, got = c.s.S // (2 * c.W), run.out.double()
    scale = float(ref.abs().max()) or 1.0
    chunk = [slice(i * n, (i + 1) * n) for i in range(2 * c.W)]
    moved_to = {}
    for i, si in enumerate(chunk):
        errs = [float((got[:, :, si] - ref[:, :, sj]).abs().max()) for sj in chunk]
        best = min(range(len(errs)), key=errs.__getitem__)
        if errs[i] > 1e-2 * scale and best != i and errs[best] <= 1e-2 * scale:
            moved_to[i] = best
        elif errs[i] > 1e-2 * scale:
            return None  # some chunk is wrong in itself: not (only) a placement
    if not moved_to:
        return None
    pairs = ", ".join(f"tokens {i * n}..{(i + 1) * n - 1} hold those of {j * n}..{(j + 1) * n - 1}"
                      for i, j in list(moved_to.items())[:3])  # fmt: skip
    return Diagnosis("ring_order", f"every output is right but some are in the wrong place: {pairs} ({run.case.name},"
                     f" {c.W} ranks, {c.layout}): a rank returned another's queries' output, or its chunks in the "
                     "wrong order", "evidence:misplaced")  # fmt: skip


@dataclass
class _Rows:
    """A probe case whose query rows are a subset (the finite ones): rows renumbered, key columns as they were."""

    W: int
    rows: list[torch.Tensor]
    cols: list[torch.Tensor]


def _rows_only(c, finite: torch.Tensor) -> _Rows:
    new = torch.cumsum(finite.long(), 0) - 1  # old row -> new row
    cols = blocks(c)
    return _Rows(c.W, [new[t][finite[t]] for t in cols], cols)


def blocks(c) -> list[torch.Tensor]:
    """Each rank's token positions: its keys' columns (and its queries' rows, unless the case keeps only some)."""
    if isinstance(c, _Rows):
        return c.cols
    return [ring_cases.tokens(c.s.S, c.W, c.layout, r) for r in range(c.W)]


def query_rows(c) -> list[torch.Tensor]:
    return c.rows if isinstance(c, _Rows) else blocks(c)


def moved(vis: torch.Tensor, rows: list[torch.Tensor], idx: list[torch.Tensor]) -> dict[int, list[int]]:
    """Source rank j -> the query ranks whose outputs its keys move."""
    W = len(idx)
    return {j: [i for i in range(W) if bool(vis[rows[i]][:, idx[j]].any())] for j in range(W)}


def pattern(P: torch.Tensor, want: torch.Tensor, c) -> Diagnosis | None:
    finite = torch.isfinite(P).all(-1)  # (S,) rows with a number everywhere
    if not bool(finite.all()):
        rows = (~finite).nonzero()[:, 0].tolist()
        # the other rows may show why (a block never merged leaves some rows with nothing to see)
        d = pattern(P[finite], want[finite], _rows_only(c, finite)) if bool(finite.any()) else None
        if d is not None and d.stage != "ring_merge":
            return Diagnosis(d.stage, f"{d.hint} (queries {rows[:8]} give NaN: they see nothing)", d.matched)
        return Diagnosis("ring_merge", f"NaN or Inf in the output of queries {rows[:8]}: a partial result from a "
                         "block the query sees nothing of (lse -inf) entered the merge unguarded", "probe:nonfinite")
    obs, exp = P.abs() > SEEN, want > 0
    if bool((obs == exp).all()):
        return None
    idx, qi, W = blocks(c), query_rows(c), c.W
    cell = {(i, j): (obs[qi[i]][:, idx[j]], exp[qi[i]][:, idx[j]]) for i in range(W) for j in range(W)}
    bad = [(i, j) for (i, j), (o, e) in cell.items() if not bool((o == e).all())]
    got_m, want_m = moved(obs, qi, idx), moved(exp, qi, idx)
    movers = "; ".join(f"rank {j}'s keys move ranks {got_m[j]} (should: {want_m[j]})" for j in range(W)
                       if got_m[j] != want_m[j])  # fmt: skip
    movers = f" Asked on the ranks: {movers}." if movers else ""
    swapped = {i: m for i in range(W) if (m := _permuted(i, cell, W))}
    if swapped:
        i, seen_as = next(iter(swapped.items()))
        pairs = ", ".join(f"rank {j}'s block masked as rank {k}'s" for j, k in list(seen_as.items())[:3])
        return Diagnosis("ring_order", f"rank {i} sees each block with another block's mask ({pairs}): the blocks "
                         f"arrive in another order than the masks assume (received from the wrong neighbour?)."
                         f"{movers}", "probe:permuted")  # fmt: skip
    missing = [(i, j) for i, j in bad if not bool(cell[(i, j)][0].any()) and bool(cell[(i, j)][1].any())]
    if missing and len(missing) == len(bad):
        own = all(i == j for i, j in missing)
        what = "its own block" if own else ", ".join(f"rank {j}'s block" for _, j in missing[:4])
        return Diagnosis("ring_order", f"whole blocks are never merged: rank {missing[0][0]} never uses {what} "
                         f"(every key of it unseen).{movers}", "probe:missing")  # fmt: skip
    i, j = bad[0]
    o, e = cell[(i, j)]
    extra, lost = int((o & ~e).sum()), int((e & ~o).sum())
    return Diagnosis("ring_mask", f"rank {i}'s queries see rank {j}'s block with the wrong mask: {extra} query-key "
                     f"pairs seen that must not be, {lost} unseen that must be ({len(bad)} of {W * W} (rank, block) "
                     f"pairs wrong).{movers}", "probe:mask")  # fmt: skip


def _permuted(i: int, cell: dict, W: int) -> dict[int, int]:
    """Rank i's row of blocks as the right set of masks, each on the wrong block: {block: the block whose mask it
    got} for the blocks that moved; {} when it is not a permutation (or nothing moved)."""
    obs = [cell[(i, j)][0] for j in range(W)]
    exp = [cell[(i, j)][1] for j in range(W)]
    used: set[int] = set()
    got: dict[int, int] = {}
    for j, o in enumerate(obs):  # its own mask first, where it fits: only what must move is said to
        k = j if bool((o == exp[j]).all()) and j not in used else None
        k = k if k is not None else next((k for k in range(W) if k not in used and bool((o == exp[k]).all())), None)
        if k is None:
            return {}
        used.add(k)
        got[j] = k
    return {j: k for j, k in got.items() if j != k}


def weights(P: torch.Tensor, want: torch.Tensor, c, a: torch.Tensor) -> Diagnosis | None:
    """The right keys seen: are their weights right?"""
    if float((P - want).abs().max()) <= TOL:
        return None
    sums = P.sum(-1)
    if float((sums - 1).abs().max()) > 1e-3:
        p = int((sums - 1).abs().argmax())
        return Diagnosis("ring_merge", f"query {p}'s weights sum to {float(sums[p]):.3f}, not 1: the blocks' partial "
                         "outputs are not renormalised to the merged denominator (summed as they are?)",
                         "probe:rowsum")  # fmt: skip
    vis = want > 0
    ratio = torch.where(vis, P / want.clamp_min(1e-300), torch.ones_like(P)).log()  # (S, S)
    # a wrong scale multiplies every score: log ratio linear in a_t along each row
    slope = _slope(ratio, a, vis)
    if slope is not None and abs(slope) > 1e-2:
        return Diagnosis("scale", f"every weight is off by exp({slope:+.3f} x its score): the scores are scaled "
                         "wrong (the scale argument, or the default 1/sqrt(d))", "probe:scale")  # fmt: skip
    idx = blocks(c)
    for i in range(c.W):
        twice = _multiples(ratio, vis, idx[i], idx)
        if twice is not None:
            j, k = twice
            return Diagnosis("ring_order", f"rank {i} counts rank {j}'s block {k} times (its weights, row by row, "
                             f"{k} times the other blocks'): a block is merged more than once", "probe:twice")
    i = next(i for i in range(c.W) if float((P[idx[i]] - want[idx[i]]).abs().max()) > TOL)
    return Diagnosis("ring_merge", f"rank {i} sees the right keys with the wrong weights, one wrong factor per block: "
                     "the partial results are not rescaled to the common max when merged (or the lse's base is not "
                     "e)", "probe:weights")  # fmt: skip


def _multiples(ratio: torch.Tensor, vis: torch.Tensor, rows: torch.Tensor, idx: list) -> tuple[int, int] | None:
    """Within each query row, one factor per block, and the factors integer multiples of the smallest (the same
    on every row): (the block counted most, how many times), else None."""
    found: dict[int, int] = {}
    for p in rows.tolist():
        f = {}
        for j, cols in enumerate(idx):
            m = vis[p, cols]
            if bool(m.any()):
                r = ratio[p, cols][m]
                if float(r.max() - r.min()) > 1e-3:
                    return None
                f[j] = float(r.mean())
        if len(f) < 2:
            continue
        low = min(f.values())
        for j, x in f.items():
            k = math.exp(x - low)
            if abs(k - round(k)) > 1e-3:
                return None
            if found.setdefault(j, round(k)) != round(k):
                return None
    top = max(found.items(), key=lambda x: x[1], default=None)
    return top if top is not None and top[1] > 1 else None


def _slope(ratio: torch.Tensor, a: torch.Tensor, vis: torch.Tensor) -> float | None:
    """The least-squares slope of log(weight ratio) against the score, rows centred; None if not a line."""
    x = a.double()[None, :].expand_as(ratio)
    xs, ys = [], []
    for p in range(ratio.shape[0]):
        m = vis[p]
        if int(m.sum()) > 1:
            xs.append(x[p][m] - x[p][m].mean())
            ys.append(ratio[p][m] - ratio[p][m].mean())
    if not xs:
        return None
    X, Y = torch.cat(xs), torch.cat(ys)
    if float((X * X).sum()) == 0:
        return None
    k = float((X * Y).sum() / (X * X).sum())
    return k if float((Y - k * X).abs().max()) < 1e-3 else None


def by_scenarios(forward: list[str], only_lse: list[str], runs: dict, where: str) -> Diagnosis:
    """The probe sees nothing wrong: what the failing scenarios share."""
    names = forward or only_lse
    base = {n.split("/")[0] for n in names}
    if only_lse and not forward:
        return Diagnosis("ring_merge", f"the output is right, the returned lse is not ({', '.join(sorted(base))}) "
                         f"{where}", "scenario:lse")  # fmt: skip
    if base == {"bfloat16"}:
        return Diagnosis("accumulation_precision", f"only bfloat16 fails: accumulate in float32 {where}",
                         "scenario:bfloat16")  # fmt: skip
    if base <= {"gqa_8_2"}:
        return Diagnosis("gqa", f"only the GQA scenario fails (8 query heads on 2 KV heads): KV head j serves query "
                         f"heads j*g .. j*g+g-1 {where}", "scenario:gqa")  # fmt: skip
    if base <= {"scale_0.3"}:
        return Diagnosis("scale", f"only the explicit scale fails: use `scale` when given {where}", "scenario:scale")
    return Diagnosis("unknown", f"the rank probe sees every block where it belongs, weighted right; failing: "
                     f"{', '.join(sorted(base))} {where}")  # fmt: skip


def diagnose_ring_grad(runs: dict, failing: dict[str, list[str]]) -> Diagnosis:
    """The forward passed. failing: scenario -> the gradients (q, k, v) wrong there."""
    names = sorted(failing, key=lambda n: runs[n].dtype != torch.float32)
    n = names[0]
    run, wrong = runs[n], failing[n]
    if any(not bool(torch.isfinite(run.got[k]).all()) for k in wrong):
        return Diagnosis("grad_nonfinite", f"NaN/Inf in d{', d'.join(wrong)} ({n})", "nonfinite")
    r, g, c = run.inputs
    if "q" not in wrong and set(wrong) & {"k", "v"}:
        local = _own_queries_only(r, g, c)
        alone = all(_close(run.got[k], local[k]) for k in ("k", "v") if k in wrong)
        why = ("each rank's dK/dV hold only its own queries' contribution: the partial gradients the other ranks "
               "computed for its keys never came back to it" if alone else "dK/dV are wrong while dQ is right: the "
               "K/V gradients travelling the ring do not end, summed, at the rank that owns the keys")  # fmt: skip
        return Diagnosis("ring_order", f"{why} ({n}, {c.W} ranks, {c.layout})", "grad:owners")
    errs = {k: _rank_errors(run, k, c) for k in wrong}
    where = "; ".join(f"d{k} off by {', '.join(f'{e:.1%}' for e in v)} of its scale on ranks 0..{c.W - 1}"
                      for k, v in errs.items())  # fmt: skip
    seen = _blocks_seen(r, c)
    one = [i for i in range(c.W) if seen[i] == 1]
    many = [i for i in range(c.W) if seen[i] > 1]
    gross = [i for i, e in enumerate(errs.get("q", [])) if e > GROSS]
    if one and many and not set(gross) & set(one) and set(many) <= set(gross):
        return Diagnosis("ring_merge", f"dq is within rounding on the ranks that attend one block ({one}) and far "
                         f"off on every rank that sums several ({many}): the per-step partial dq are combined "
                         f"wrongly (a buffer reused while it is still read?); {where} ({n}, {c.W} ranks, {c.layout})",
                         "grad:accumulate")  # fmt: skip
    return Diagnosis("grad_unknown", f"the forward is right; {where} ({n}, {c.W} ranks, {c.layout})")


def _rank_errors(run, k: str, c) -> list[float]:
    """Each rank's largest error in gradient k against float64, as a fraction of the gradient's scale."""
    got, ref = run.got[k].double(), run.ref64[k].double()
    S, scale = ref.shape[2], float(ref.abs().max()) or 1.0
    out = []
    for rank in range(c.W):
        tok = ring_cases.tokens(c.padded, c.W, c.layout, rank)
        tok = tok[tok < S]
        out.append(float((got[:, :, tok] - ref[:, :, tok]).abs().max()) / scale if len(tok) else 0.0)
    return out


def _blocks_seen(r, c) -> list[int]:
    """How many ranks' key blocks each rank's queries see (real tokens)."""
    keep = r.keep4[0, 0]  # (S, S)
    S = keep.shape[0]
    tok = [t[t < S] for t in (ring_cases.tokens(c.padded, c.W, c.layout, i) for i in range(c.W))]
    return [sum(bool(keep[tok[i]][:, tok[j]].any()) for j in range(c.W)) for i in range(c.W)]


def _own_queries_only(r, g, c) -> dict:
    """dk, dv as a rank would have them if only its own queries counted, float64 (transformers' function)."""
    q, k, v = (x.double().detach().requires_grad_(True) for x in (r.q, r.k, r.v))
    S = r.q.shape[2]
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    with torch.enable_grad():
        out = kernel_hf.forward(q, k, v, r.keep4, r.scale, path="float64")  # (B, H, S, d)
        for rank in range(c.W):
            tok = ring_cases.tokens(c.padded, c.W, c.layout, rank)
            tok = tok[tok < S]
            gk, gv = torch.autograd.grad((out[:, :, tok] * g.double()[:, :, tok]).sum(), [k, v], retain_graph=True)
            dk[:, :, tok], dv[:, :, tok] = gk[:, :, tok], gv[:, :, tok]
    return {"k": dk, "v": dv}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) or 1.0
    return float((a.double() - b).abs().max()) <= 1e-3 * scale
