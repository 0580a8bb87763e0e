"""The ring contract (`--ring`): attention whose sequence is split across the ranks of a process group (context
parallelism: ring attention, zigzag, all-gather).

    attn(q, k, v, *, group, causal=True, scale=None, layout="contiguous") -> out or (out, lse)
    called on every rank of a torch.distributed group the harness makes (gloo on a CPU, nccl on CUDA), with that
    rank's shard: q [B, H, S/W, d], k and v [B, Hkv, S/W, d]; layout "contiguous" (rank r: tokens [r S/W,
    (r + 1) S/W)) or "zigzag" (chunks r and 2W - 1 - r of 2W); causal by global positions; out [B, H, S/W, d] in q's
    dtype, lse [B, H, S/W] float32 natural log. The code declares its layouts: `layouts = ("contiguous",
    "zigzag")` (default contiguous only); it runs in each layout it declares.

    targets     W = 2 and W = 4 ranks (`ring-w2`, `ring-w4`), each rank a worker process (ranks.py); under torchrun
                the launched ranks (launched.py)
    cases       ring_cases.py: causal and not, GQA, a length padded to 2W, large scores, a scale, float32, bfloat16
    compared    the ranks' outputs gathered in the parent against transformers on the whole sequence (compare.py's
                policy), the lse within ring_cases' tolerance of float64
    comm        each rank's bytes sent and received (ring_serve.py counts them), and comm_ratio = bytes sent / the
                ring's forward ideal, (W - 1) x the rank's K and V shard bytes: in the verdict's JSON (`comm`)
    diagnosis   diagnosis/ring.py: ring_merge, ring_mask, ring_order, from probes run on the ranks
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

import impl as builtin_impls
from harness.verify import launched, ranks, ring_cases
from harness.verify import ring_serve as serve_fns
from harness.verify.compare import compare as compare_tensors
from harness.verify.compare import not_run as no_output
from harness.verify.compare import within
from harness.verify.contracts import core
from harness.verify.diagnosis import ring as diagnosis
from harness.verify.worker import Fault

NAME = "ring"
OPTION = "--ring"
HELP = ("ring (context-parallel) kernels on W = 2 and 4 ranks: built-in names or module:function, attn(q, k, v, *, "
        "group, causal=True, scale=None, layout=\"contiguous\") -> out or (out, lse), called on every rank with its "
        "shard; a `layouts` attribute declares contiguous and/or zigzag")  # fmt: skip
GRAD = "ring_grad"
FAULT_CHECK = "forward"
SERVE = "harness.verify.ring_serve:ring"
serve = serve_fns.ring
WORLDS = (2, 4)
THIS = sys.modules[__name__]


@dataclass(frozen=True)
class World:
    """W ranks as a target: the rows' fixture column says `ring-wW`."""

    name: str
    W: int


def builtins() -> dict:
    return dict(getattr(builtin_impls, "RING", {}))


def implementation(spec: str, fn, device: str):
    """Every ring kernel, a built-in too, runs in W rank processes (ranks.py), or in torchrun's (launched.py)."""
    if launched.world() is not None:
        return launched.make(spec, fn, NAME, device)
    return ranks.make(spec, fn, NAME, device)


def targets(fixtures) -> list[World]:
    """W = 2 and 4 rank workers (on CUDA, as many as there are devices: nccl puts one rank on each); under torchrun
    the launched world."""
    W = launched.world()
    if W is not None:
        return [World(f"ring-w{W}", W)]
    worlds = WORLDS
    if torch.cuda.is_available() and torch.cuda.device_count() < max(WORLDS):
        worlds = tuple(w for w in WORLDS if w <= torch.cuda.device_count()) or WORLDS
    return [World(f"ring-w{w}", w) for w in worlds]


def cases(target: World, ctx, impl) -> list:
    layouts = impl.layouts(target.W) if impl is not None else ("contiguous",)
    return ring_cases.select(ctx.dtypes, ctx.quick, target.W, layouts)


def reference(target, c: ring_cases.RingCase, ctx, device="cpu") -> ring_cases.RingRef:
    return ring_cases.reference(c.s, ctx.cache.setdefault(NAME, {}))


@dataclass
class RingGot:
    out: torch.Tensor  # (B, H, S, d): the ranks' outputs gathered, real tokens only
    lse: torch.Tensor | None  # (B, H, S)
    parts: list  # each rank's (out, lse) as it came
    comm: list[dict]  # per rank: bytes sent, received, calls


def run_ring(impl, c: ring_cases.RingCase, parts: list[dict], *, causal: bool, scale, contract=THIS,
             doing: str = "running the ring") -> RingGot:  # fmt: skip
    """Every rank's shard in, every rank's reply checked against the contract, the outputs gathered. The
    diagnosis's probes call it too (on their own inputs)."""
    header = {"causal": causal, "scale": scale, "layout": c.layout}
    q0 = parts[0]["q"]
    replies = impl.call_ranks(contract, c.W, header, parts, doing, expect=2 * q0.numel() + 64)
    outs, lses, comm = [], [], []
    for r, (descs, items) in enumerate(replies):
        m = meta(descs, items, r)
        code_descs = [{k: x for k, x in d.items() if k != "in_tuple"} | ({"in_tuple": True} if m[3] else {})
                      for d in descs[1:]]  # fmt: skip
        try:
            out, lse = core.check_output(code_descs, items[1:], parts[r]["q"], impl.rank_device(r))
        except Fault as e:
            raise Fault(e.stage, f"rank {r}: {e.message}") from None
        outs.append(out)
        lses.append(lse)
        comm.append({"rank": r, "bytes_sent": int(m[0]), "bytes_received": int(m[1]), "calls": int(m[2])})
    if len({x is None for x in lses}) > 1:
        raise Fault("contract", "some ranks returned (out, lse) and others out alone: every rank returns the same")
    lse = None if lses[0] is None else ring_cases.gathered(lses, c)
    return RingGot(ring_cases.gathered(outs, c), lse, list(zip(outs, lses, strict=True)), comm)


def meta(descs: list[dict], items: list, r: int) -> list[int]:
    """The serve function's first item: [bytes sent, bytes received, calls, returned a tuple]."""
    if not descs or descs[0].get("shape") != [4] or descs[0].get("dtype") != "int64" or items[0] is None:
        raise Fault("contract", f"rank {r}: its reply lacks the harness's byte counts (the code replaced the ring "
                    "contract's serve function?)")  # fmt: skip
    return [int(x) for x in items[0].tolist()]


def call(impl, target, c: ring_cases.RingCase, ref: ring_cases.RingRef) -> RingGot:
    return run_ring(impl, c, ring_cases.inputs(c, ref), causal=c.causal, scale=c.scale)


def not_run(c, ref: ring_cases.RingRef):
    return no_output(ref.ref, c.dtype)


def compare(target, c: ring_cases.RingCase, ref: ring_cases.RingRef, got: RingGot) -> list:
    rows = ring_cases.rows_of
    keep = torch.ones(ref.ref.shape[0], ref.ref.shape[2], dtype=torch.bool)  # (B, S): every real token
    checks = [("forward", compare_tensors(rows(got.out), rows(ref.ref), rows(ref.ref64), keep, c.dtype))]
    if got.lse is not None:
        rule = "|lse-lse64|<=1e-3" if c.dtype == torch.float32 else "|lse-lse64|<=2x|HF-lse64|+1e-3"
        checks.append(("lse", within(ring_cases.lse_error(got.lse, ref), ref.lse_tol, rule)))
    return checks


def evidence(target, c: ring_cases.RingCase, ref: ring_cases.RingRef, got: RingGot) -> diagnosis.RingRun:
    err = None if got.lse is None else ring_cases.lse_error(got.lse, ref)
    return diagnosis.RingRun(c, ref, got.out, err, with_ratio(got.comm, ring_cases.ideal_bytes(c)))


def with_ratio(comm: list[dict], ideal: int) -> list[dict]:
    return [x | {"ideal_bytes": ideal, "comm_ratio": round(x["bytes_sent"] / ideal, 4) if ideal else None}
            for x in comm]  # fmt: skip


def annotate(v, runs: dict) -> None:
    """The verdict's `comm`: per rank, the bytes of every forward case together, and their ratio to the ideal."""
    cases = {n: r.comm for n, r in runs.items() if isinstance(r, diagnosis.RingRun)}
    if not cases:
        return
    W = len(next(iter(cases.values())))
    ranks_ = []
    for r in range(W):
        sent = sum(c[r]["bytes_sent"] for c in cases.values())
        ideal = sum(c[r]["ideal_bytes"] for c in cases.values())
        got = sum(c[r]["bytes_received"] for c in cases.values())
        ranks_.append({"rank": r, "bytes_sent": sent, "bytes_received": got, "ideal_bytes": ideal,
                       "comm_ratio": round(sent / ideal, 4)})  # fmt: skip
    v.comm = {"world": W, "ideal": "(W - 1) x the rank's K and V shard bytes, forward", "ranks": ranks_,
              "comm_ratio": max(x["comm_ratio"] for x in ranks_), "cases": cases}  # fmt: skip


def diagnose(target, runs: dict, failed: dict, passing: list, impl, ctx):
    failing = [n if ch == "forward" else f"{n}:{ch}" for n, checks in failed.items() for ch in checks]
    return diagnosis.diagnose_ring(runs, failing, passing, lambda c, parts, **kw: run_ring(impl, c, parts, **kw))
