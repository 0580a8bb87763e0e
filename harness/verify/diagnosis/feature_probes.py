"""Probes of a kernel's window, softcap and sinks: the kernel asked directly (through run_kernel), on inputs of the
diagnosis's own, each built so that the output reads off one thing. The answers say what was measured.

    window   q = k = 0 (every visible key weighs the same) and v one-hot per key (v_j = e_j): out[i, j] > 0 exactly
             when query i sees key j, so one call reads the window's true left and right edges, row by row:
             (7, 0) causal (the left edge), (5, 3) causal=False (the right edge), (3, 0) with 8 queries of 48 keys
             (where the window sits: bottom-right, query i at position Sk - Sq + i); then random inputs where key 0
             changes: the queries whose window excludes it must not move
    softcap  one query, keys whose scaled scores are -30 .. 30 and a key of score 0, v one-hot: log(out_j / out_0)
             is the score key j ends up with, so the cap's curve is read off (softcap 10: it must saturate at +-10);
             a padded key must stay at weight 0 (the cap comes before the mask)
    sinks    q = k = 0, v one-hot: 1 - sum_j out_j is the sink's share of each row, P = e^s / (e^s + n) with n keys
             seen, so the sink logit each query head used is read off (its head, its sign, whether it grows with
             n); every sink at -inf must give the no-sink output; lse, when returned, must be log(e^s + n)
"""

from __future__ import annotations

import torch

from harness.verify import kernel_hf
from harness.verify.diagnosis.evidence import Diagnosis

D = 64  # head_dim of the probes (v one-hot per key: at most D keys)
SEEN = 1e-7  # a visible key weighs at least 1/48 here; an invisible one exactly 0


def ask(probe, call) -> Diagnosis | None:
    """A probe's answer; None when the kernel cannot answer it (that decides nothing)."""
    try:
        return probe(call)
    except Exception:  # noqa: BLE001 - whatever the kernel raises
        return None


# ---------------------------------------------------------------------------------------------------------
# window


def weights(call, Sq: int, Sk: int, causal: bool, window) -> torch.Tensor:
    """(Sq, Sk) float64: the weight each query gives each key, q = k = 0 (all scores 0), v one-hot per key."""
    q, k = torch.zeros(1, 1, Sq, D), torch.zeros(1, 1, Sk, D)
    v = torch.eye(Sk, D)[None, None].contiguous()
    out, _ = call(q, k, v, causal=causal, scale=None, mask=None, window=window)
    if not torch.isfinite(out).all():
        raise ValueError("NaN or Inf: nothing to read (the non-finite diagnosis names it)")
    return out[0, 0, :, :Sk].double()


def expected(Sq: int, Sk: int, causal: bool, window) -> torch.Tensor:
    """(Sq, Sk) bool: the keys each query sees, as transformers' masking_utils builds the mask."""
    return kernel_hf.allowed(1, Sq, Sk, causal, window, None)[0, 0]


def edges(seen: torch.Tensor, Sq: int, Sk: int) -> tuple[int | None, int | None, bool]:
    """(left, right, ranges) measured: how far back (p - first key seen) and ahead (last key seen - p) the queries
    see, over the rows where that edge is not clipped by the sequence (None: never bounded, or not one value), and
    whether every row sees one contiguous range."""
    lefts, rights, ranges = set(), set(), True
    for i in range(Sq):
        js = torch.nonzero(seen[i]).flatten().tolist()
        if not js:
            continue
        p, lo, hi = i + Sk - Sq, js[0], js[-1]
        ranges &= hi - lo + 1 == len(js)
        if lo > 0:
            lefts.add(p - lo)
        if hi < Sk - 1:
            rights.add(hi - p)
    return (lefts.pop() if len(lefts) == 1 else None), (rights.pop() if len(rights) == 1 else None), ranges


def _sw(left: int) -> str:
    return f"transformers' sliding_window {left + 1}"


def _window_edges(call) -> Diagnosis | None:
    """Causal, window (7, 0) over 48 keys: where the left edge is; then causal=False, (5, 3): the right edge."""
    for causal, window in ((True, (7, 0)), (False, (5, 3))):
        S = 48
        want = expected(S, S, causal, window)
        seen = weights(call, S, S, causal, window) > SEEN
        if torch.equal(seen, want):
            continue
        left, right, ranges = edges(seen, S, S)
        L, R = window
        given = f"given window {window}" + (f" ({_sw(L)})" if causal else "")
        if not ranges:
            rows = [i for i in range(S) if not torch.equal(seen[i], want[i])][:3]
            shown = "; ".join(f"query {i} sees {torch.nonzero(seen[i]).flatten().tolist()}" for i in rows)
            return Diagnosis("sliding_window", f"{given}, the keys a query sees are not one range ({shown}): key j is "
                             "visible only if p - left <= j <= p + right", "probe:window_range")  # fmt: skip
        if left is None and bool(seen[:, 0].all()):
            return Diagnosis("sliding_window", f"{given}, every query sees every key back to the first: the window is "
                             "not applied (key j visible only if p - left <= j <= p + right)", "probe:window_none")
        if left is not None and left != L:
            return _left_edge(given, L, left, window)
        if causal and (seen & ~expected(S, S, True, None)).any():
            return Diagnosis("sliding_window", f"{given}, queries see later keys: with causal=True and a window the "
                             "mask is causal AND window", "probe:window_causal")  # fmt: skip
        if not causal and right != R:
            far = "never bounded" if right is None else f"{right} key{'s' * (right != 1)} ahead"
            what = ("sees one key too many at the window's right edge" if right == R + 1 else
                    "misses the key at the window's right edge" if right == R - 1 else "the right edge is off")
            return Diagnosis("sliding_window", f"{what}: {given} query p sees up to {far}, where it should see up to "
                             f"p + {R}: keep key j when j <= p + right", "probe:window_right")  # fmt: skip
        return Diagnosis("sliding_window", f"{given}, the keys seen differ from the window's (measured edges: "
                         f"left {left}, right {right}): key j is visible only if p - left <= j <= p + right",
                         "probe:window_edges")  # fmt: skip
    return None


def _left_edge(given: str, L: int, left: int, window) -> Diagnosis:
    if left == L + 1:
        what = (f"sees one key too many at the window's left edge: {given} query p sees keys p - {left} .. p, the "
                f"window ({left}, {window[1]}); transformers' sliding_window W is (W - 1, 0)")  # fmt: skip
    elif left == L - 1:
        what = (f"misses the key at the window's left edge: {given} query p sees keys p - {left} .. p, the window "
                f"({left}, {window[1]}); transformers' sliding_window W is (W - 1, 0)")  # fmt: skip
    else:
        what = f"{given}, query p sees back to p - {left}, not p - {L}"
    return Diagnosis("sliding_window", what + ": keep key j when p - left <= j", "probe:window_left")


def _window_alignment(call) -> Diagnosis | None:
    """Causal, window (3, 0), 8 queries of 48 keys: query i at position 40 + i sees keys 37 + i .. 40 + i."""
    Sq, Sk, window = 8, 48, (3, 0)
    want = expected(Sq, Sk, True, window)
    seen = weights(call, Sq, Sk, True, window) > SEEN
    if torch.equal(seen, want):
        return None
    at = set()  # where each query's window sits, from its last key seen (the window's right edge, 0 ahead)
    for i in range(Sq):
        js = torch.nonzero(seen[i]).flatten().tolist()
        if js:
            at.add(js[-1] - i)
    where = ""
    if at == {0}:
        where = (f": query i sees keys up to i (query 7 sees {torch.nonzero(seen[7]).flatten().tolist()}), the window "
                 "aligned top-left")  # fmt: skip
    return Diagnosis("sliding_window", f"with {Sq} queries of {Sk} keys and window {window}, the keys seen are not "
                     f"those of query i at position {Sk - Sq} + i{where}: windows are bottom-right aligned like the "
                     "causal mask, query i at p = Sk - Sq + i sees p - left .. p + right", "probe:window_alignment")


def _window_outside(call) -> Diagnosis | None:
    """Random inputs; key 0 changed (its k and v): the queries whose window (7, 0) excludes it must not move."""
    g = torch.Generator().manual_seed(31)
    S, window = 48, (7, 0)
    q, k, v = (torch.randn(1, 2, S, D, generator=g) for _ in range(3))
    k, v = k[:, :1].contiguous(), v[:, :1].contiguous()
    out, _ = call(q, k, v, causal=True, scale=None, mask=None, window=window)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0], v2[:, :, 0] = 4 * k[:, :, 0], v[:, :, 0] + 3
    out2, _ = call(q, k2, v2, causal=True, scale=None, mask=None, window=window)
    outside = ~expected(S, S, True, window)[:, 0]  # queries that must not see key 0
    moved = float((out2 - out).double().abs()[0, :, outside].max())
    if not moved > 1e-5 * max(float(out.abs().max()), 1e-6):
        return None
    first = int(torch.nonzero(outside).flatten()[0])
    return Diagnosis("sliding_window", f"key 0, outside the window {window} of queries {first}..{S - 1}, changes their "
                     f"output (by {moved:.2e}): keys outside the window must not count at all, not in the softmax's "
                     "denominator either", "probe:window_outside")  # fmt: skip


def window(call) -> Diagnosis | None:
    for probe in (_window_edges, _window_alignment, _window_outside):
        found = ask(probe, call)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------------
# softcap

CAP = 10.0
SCORES = (-30.0, -20.0, -10.0, -5.0, -2.0, 2.0, 5.0, 10.0, 20.0, 30.0)  # scaled scores; key 0 scores 0


def _read_cap(call) -> tuple[torch.Tensor, float]:
    """(the score each key of SCORES ends up with, relative to key 0's; the weight of a padded key)."""
    t = (0.0, *SCORES, 25.0)  # key 0: score 0; the last: padded
    n = len(t)
    q = torch.zeros(1, 1, 1, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, D)
    k[0, 0, :, 0] = torch.tensor(t) * D**0.5  # the default scale 1/sqrt(D) brings them back to t
    v = torch.eye(n, D)[None, None].contiguous()
    mask = torch.ones(1, n, dtype=torch.long)
    mask[0, -1] = 0
    out, _ = call(q, k, v, causal=True, scale=None, mask=mask, softcap=CAP)
    w = out[0, 0, 0, :n].double()
    return torch.log(w[1:-1]) - torch.log(w[0]), float(w[-1])


def softcap(call) -> Diagnosis | None:
    return ask(_softcap, call)


def _softcap(call) -> Diagnosis | None:
    got, padded = _read_cap(call)
    t = torch.tensor(SCORES, dtype=torch.float64)
    want = CAP * torch.tanh(t / CAP)
    show = ", ".join(f"{float(a):.3g}" for a in got[-3:])
    tail = f"the scores 10, 20, 30 come out as {show} (softcap {CAP:g}: 7.62, 9.64, 9.95)"
    if padded > 1e-12:
        return Diagnosis("softcap", f"a padded key gets weight {padded:.1e} with softcap {CAP:g}: the mask looks "
                         "added before the cap (its -inf or the dtype's minimum capped to -softcap); cap the scores, "
                         "then mask them", "probe:softcap_mask")  # fmt: skip
    if not torch.isfinite(got).all() or float((got - want).abs().max()) < 0.05:
        return None
    if float((got - t).abs().max()) < 0.05:
        return Diagnosis("softcap", f"the output does not saturate: {tail}: the scores are not capped; apply "
                         "softcap * tanh(scores / softcap) after the scale", "probe:softcap_none")  # fmt: skip
    a = float(got[-1] - got[0]) / 2  # the level it saturates at
    if a > 0 and float((got - a * torch.tanh(t / a)).abs().max()) < 0.05:
        scale = D**-0.5
        why = ""
        if abs(a - CAP * scale) < 0.05 * CAP * scale:
            why = (f": softcap x scale ({CAP:g} x {scale:g}), the cap applied to q k^T before the scale; cap the "
                   "scaled scores, softcap * tanh(scale q k^T / softcap)")  # fmt: skip
        return Diagnosis("softcap", f"the scores saturate at +-{a:.3g}, not +-{CAP:g} ({tail}){why}",
                         "probe:softcap_level")
    return Diagnosis("softcap", f"{tail}: not softcap * tanh(score / softcap) after the scale", "probe:softcap_curve")


# ---------------------------------------------------------------------------------------------------------
# sinks

SINKS = (-1.0, 0.5, 1.5, 2.5)  # one per query head, distinct: whose sink a head used reads off
H, HKV, S_SINK = 4, 2, 16


def _sink_call(call, sinks):
    q, k = torch.zeros(1, H, S_SINK, D), torch.zeros(1, HKV, S_SINK, D)
    v = torch.eye(S_SINK, D)[None, None].expand(1, HKV, S_SINK, D).contiguous()
    kw = {} if sinks is None else {"sinks": sinks}
    out, lse = call(q, k, v, causal=True, scale=None, mask=None, **kw)
    return out[0, :, :, :S_SINK].double(), lse


def sinks(call, lse_only: bool = False) -> Diagnosis | None:
    return ask(lambda c: _sinks(c, lse_only), call)


def _sinks(call, lse_only: bool) -> Diagnosis | None:
    s = torch.tensor(SINKS)
    n = torch.arange(1, S_SINK + 1, dtype=torch.float64)  # keys seen by query i
    w, lse = _sink_call(call, s)
    if lse_only:
        return _sink_lse(lse, n)
    plain, _ = _sink_call(call, None)
    off, _ = _sink_call(call, torch.full((H,), float("-inf")))
    note = ""
    if not torch.isfinite(off).all() or float((off - plain).abs().max()) > 1e-5:
        bad = "NaN or Inf" if not torch.isfinite(off).all() else f"off by {float((off - plain).abs().max()):.2e}"
        note = f"with every sink at -inf the output is not the no-sink output ({bad}); "
    if not torch.isfinite(w).all():
        return Diagnosis("sinks", note + "NaN or Inf with finite sinks (-1 .. 2.5) and every query seeing a key",
                         "probe:sinks_nonfinite")
    found = _sink_share(w, s, n)
    if found is None and note:
        return Diagnosis("sinks", note + "a sink at -inf has exp(-inf) = 0 weight", "probe:sinks_off")
    if found is not None:
        return Diagnosis("sinks", note + found[0], found[1])
    return None


def _sink_share(w: torch.Tensor, s: torch.Tensor, n: torch.Tensor) -> tuple[str, str] | None:
    """(hint, probe) from the weights of q = k = 0 with sinks s (H, S, S), or None when they are right."""
    visible = torch.ones(S_SINK, S_SINK, dtype=torch.bool).tril()
    if float(w[:, ~visible].abs().max()) > 1e-6:
        return "later keys get weight with sinks: the sink must add no key", "probe:sinks_keys"
    kept = w.masked_fill(~visible, float("nan"))
    spread = kept.nan_to_num(-1e9).amax(-1) - kept.nan_to_num(1e9).amin(-1)  # (H, S)
    if float(spread.max()) > 1e-5:
        h, i = divmod(int(spread.argmax()), S_SINK)
        j = int(kept[h, i].nan_to_num(-1e9).argmax())
        more = float(spread[h, i])
        return (f"the keys' weights differ where their scores are equal (all 0): key {j} gets {more:.3g} "
                f"more than the others (query head {h}, query {i}), as if the sink's share went to key {j}'s value: a "
                "sink has no value (drop its column after the softmax)", "probe:sinks_value")  # fmt: skip
    share = 1 - w.sum(-1)  # (H, S): the sink's share of each row
    sd = s.double()[:, None]
    want = torch.exp(sd) / (torch.exp(sd) + n)
    if float((share - want).abs().max()) < 1e-4:
        return None
    if float(share.abs().max()) < 1e-6:
        return ("the sink takes no share: the keys' weights sum to 1 with sinks given; the softmax's denominator "
                "must get exp(sinks[h])", "probe:sinks_none")  # fmt: skip
    if float((share - share[:, :1]).abs().max()) < 1e-4:
        return (f"the sink's share is the same whatever the number of keys a query sees ({float(share[-1, 0]):.3f} "
                f"with 1 key and with {S_SINK}, head {H - 1}; expected {float(want[-1, 0]):.3f} and "
                f"{float(want[-1, -1]):.3f}): the sink looks added after normalising; exp(sinks[h]) belongs in the "
                "denominator beside the keys' exp(s_j)", "probe:sinks_normalised")  # fmt: skip
    valid = (share > 1e-9) & (share < 1 - 1e-9)
    logit = torch.log(share / (1 - share)) + torch.log(n)  # the sink logit each row behaves as having
    if not valid.all() or float((logit - logit[:, :1]).abs().max()) > 1e-2:
        return (f"the sink's share of a row is not exp(s) / (exp(s) + n) for any one logit s per head (head "
                f"{H - 1}: {float(share[-1, 0]):.3f} with 1 key, {float(share[-1, -1]):.3f} with {S_SINK})",
                "probe:sinks_share")  # fmt: skip
    used = logit[:, 0]
    given = ", ".join(f"{x:g}" for x in SINKS)
    read = ", ".join(f"{float(x):.3g}" for x in used)
    if float((used + s.double()).abs().max()) < 1e-2:
        return (f"the sink logits act negated (given {given}, they act as {read}): the denominator gets "
                "exp(sinks[h]), not exp(-sinks[h])", "probe:sinks_sign")  # fmt: skip
    heads = [next((j for j in range(H) if abs(float(used[h]) - SINKS[j]) < 1e-2), None) for h in range(H)]
    if None not in heads:
        g = H // HKV
        kv = " (its KV head's index, h // g)" if heads == [h // g for h in range(H)] else ""
        shown = ", ".join(f"{h}->{j}" for h, j in enumerate(heads))
        return (f"query heads use the sinks of heads {shown}{kv} ({H} query heads, {HKV} KV heads): one sink "
                "logit per query head, sinks[h]", "probe:sinks_heads")  # fmt: skip
    return f"the sink logits act as {read}, given {given}", "probe:sinks_logit"


def _sink_lse(lse: torch.Tensor | None, n: torch.Tensor) -> Diagnosis | None:
    if lse is None:
        return None
    got = lse[0].double()  # (H, S)
    want = torch.log(torch.exp(torch.tensor(SINKS, dtype=torch.float64))[:, None] + n)
    if float((got - want).abs().max()) < 1e-3:
        return None
    if float((got - torch.log(n)).abs().max()) < 1e-3:
        return Diagnosis("sinks", "lse leaves the sink out: it is log(n) for n keys of score 0, where the whole "
                         "denominator gives log(exp(sinks[h]) + n); lse = log(exp(sinks[h]) + sum_j exp(s_j))",
                         "probe:sinks_lse")  # fmt: skip
    return Diagnosis("sinks", f"lse is off with sinks (by {float((got - want).abs().max()):.3g}): lse = "
                     "log(exp(sinks[h]) + sum_j exp(s_j)), the sink's term included", "probe:sinks_lse")

