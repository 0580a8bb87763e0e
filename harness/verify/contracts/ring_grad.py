"""The gradients of a ring kernel (`--ring ... --grad`), run after its forward passes: every rank backpropagates
sum(out * g) through the code (its autograd Function carries dK/dV around the ring) and returns dq, dk, dv of its
shard; the parent gathers them and compares the whole sequence's gradients with transformers' function through
autograd (grads.py: the references and the rule), in the dtype and in float64. g is zero on padding tokens."""

from __future__ import annotations

import sys

from harness.verify import grads, kernel_hf, ring_cases
from harness.verify import ring_serve as serve_fns
from harness.verify.compare import not_run as no_output
from harness.verify.contracts import ring
from harness.verify.contracts.layer_grad import check_grads
from harness.verify.diagnosis.ring import diagnose_ring_grad
from harness.verify.worker import Fault

NAME = "ring_grad"
OPTION = None
HELP = "the gradients of a ring kernel"
GRAD = None
FAULT_CHECK = "grad"
THIS = sys.modules[__name__]
SERVE = "harness.verify.ring_serve:ring_grad"
serve = serve_fns.ring_grad
QUICK = ("causal_64", "noncausal_64", "gqa_8_2", "len_61_padded", "bfloat16")
FULL = QUICK + ("scores_x8", "scale_0.3", "len_256")


def builtins() -> dict:
    return ring.builtins()


def targets(fixtures):
    return ring.targets(fixtures)


def cases(target, ctx, impl, forward: list | None = None) -> list:
    names = QUICK if ctx.quick else FULL
    return [c for c in (forward if forward is not None else ring.cases(target, ctx, impl)) if c.s.name in names]


def reference(target, c: ring_cases.RingCase, ctx, device="cpu"):
    """(the forward's reference, g, transformers' gradients eager, float64, sdpa), once per scenario."""
    r = ring.reference(target, c, ctx, device)
    cache, key = ctx.cache.setdefault(ring.NAME, {}), (c.s.name, c.s.S, "grad")
    if key not in cache:
        g = grads.seeded_g(r.ref.shape, None, c.dtype)
        kw = (r.q, r.k, r.v, r.keep4, g, r.scale, c.dtype)
        cache[key] = (g, grads.hf_kernel_grads(*kw), grads.hf_kernel_grads(*kw, float64=True),
                      grads.hf_kernel_grads(*kw, path="sdpa") if kernel_hf.has_sdpa_path(0.0, None) else None)
    return (r, *cache[key])


def call(impl, target, c: ring_cases.RingCase, ref) -> dict:
    r, g = ref[0], ref[1]
    parts = ring_cases.inputs(c, r)
    for p, gs in zip(parts, ring_cases.shard(ring_cases.pad(g, c.padded), c.W, c.layout), strict=True):
        p["g"] = gs
    header = {"causal": c.causal, "scale": c.scale, "layout": c.layout}
    replies = impl.call_ranks(THIS, c.W, header, parts, "computing gradients on the ring",
                              expect=sum(x.numel() for x in parts[0].values()) + 64)  # fmt: skip
    got = {"q": [], "k": [], "v": []}
    for rank, (descs, items) in enumerate(replies):
        ring.meta(descs, items, rank)
        wrt = {n: parts[rank][n] for n in ("q", "k", "v")}
        try:
            one = check_grads(descs[1:], items[1:], wrt, "core", impl.rank_device(rank))
        except Fault as e:
            raise Fault(e.stage, f"rank {rank}: {e.message}") from None
        except ValueError:  # zip(strict): too few or too many items
            raise Fault("contract", f"rank {rank}: {len(descs) - 1} items came back for the 3 gradients") from None
        for n in got:
            got[n].append(one[n])
    return {n: ring_cases.gathered(v, c) for n, v in got.items()}


def not_run(c, ref):
    return no_output(ref[0].ref, c.dtype)


def run_of(c, ref, got) -> grads.GradRun:
    r, g, eager, ref64, sdpa = ref
    return grads.GradRun(got, eager, ref64, c.dtype, sdpa, None, (r, g, c))


def compare(target, c, ref, got: dict) -> list:
    run = run_of(c, ref, got)
    return [(f"grad_{n}", grads.compare_grad(n, run)) for n in got]


def evidence(target, c, ref, got: dict) -> grads.GradRun:
    return run_of(c, ref, got)


def failing_names(failed: dict) -> list[str]:
    return [f"{n}:grad" for n in failed]


def diagnose(target, runs: dict, failed: dict, passing: list, impl, ctx):
    names = {n: [ch.removeprefix("grad_") for ch in checks] for n, checks in failed.items()}
    return diagnose_ring_grad(runs, names)

