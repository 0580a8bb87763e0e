"""The gradients of a kernel (`--grad`), run after its forward passes: gradients of sum(out * g) w.r.t. q, k and v,
and w.r.t. the sinks where the scenario gives them (check `grad_sinks`), on the kernel matrix, against
transformers' functions (kernel_hf.py) in the dtype and in float64 through autograd (verify/grads.py: the
references and the rule), diagnosed by diagnosis/grad.py. A scenario the forward skipped (a keyword the kernel's
signature lacks) is not run here either."""

from __future__ import annotations

import sys

from harness.verify import grads, kernel_hf, kernels
from harness.verify import serve as serve_fns
from harness.verify.compare import not_run as no_output
from harness.verify.contracts import core
from harness.verify.contracts.layer_grad import check_grads
from harness.verify.diagnosis.grad import diagnose_grads
from harness.verify.serve import core_gradients

NAME = "core_grad"
OPTION = None
HELP = "the gradients of a kernel"
GRAD = None
FAULT_CHECK = "grad"
THIS = sys.modules[__name__]  # the contract whose serve() computes the gradients
SERVE = "harness.verify.serve:core_grad"
serve = serve_fns.core_grad


def builtins() -> dict:
    return core.builtins()


def targets(fixtures):
    return core.targets(fixtures)


def cases(target, ctx, impl, forward: list | None = None) -> list:
    names = grads.KERNEL_QUICK if ctx.quick else grads.KERNEL_FULL
    return [s for s in (forward if forward is not None else core.cases(target, ctx, impl)) if s.name in names]


def reference(target, s, ctx, device="cpu"):
    """(the forward case, g, transformers' gradients eager, in float64, sdpa (None where transformers' sdpa path
    cannot compute the case: softcap, sinks)), once per scenario."""
    c = core.reference(target, s, ctx, device)
    g = grads.seeded_g(c.ref.shape, c.keep[:, None, :], s.dtype)
    kc, key = ctx.cache[core.KERNELS.name], (s.name, "grad")
    if key not in kc:
        mask4 = kernels.allowed(s, c.mask)
        scale, kw = kernels.scale_of(s), {"softcap": s.softcap, "sinks": c.sinks}
        kc[key] = (grads.hf_kernel_grads(c.q, c.k, c.v, mask4, g, scale, s.dtype, **kw),
                   grads.hf_kernel_grads(c.q, c.k, c.v, mask4, g, scale, s.dtype, float64=True, **kw),
                   grads.hf_kernel_grads(c.q, c.k, c.v, mask4, g, scale, s.dtype, path="sdpa")
                   if kernel_hf.has_sdpa_path(s.softcap, c.sinks) else None)  # fmt: skip
    return (c, g, *kc[key])


def unsupported(target, s, impl) -> str | None:
    return core.unsupported(target, s, impl)


def call(impl, target, s, ref) -> dict:
    c, g = ref[0], ref[1]
    header, more = core.features(**core.keywords(s, c))
    t = {"q": c.q, "k": c.k, "v": c.v, "g": g} | ({} if c.mask is None else {"attention_mask": c.mask}) | more
    descs, items = impl.call(THIS, {"causal": s.causal, "scale": s.scale} | header, t, "computing gradients")
    wrt = {"q": c.q, "k": c.k, "v": c.v} | ({} if c.sinks is None else {"sinks": c.sinks})
    return check_grads(descs, items, wrt, "core", impl.device)


def not_run(s, ref):
    return no_output(ref[0].ref, s.dtype)


def run_of(s, ref, got) -> grads.GradRun:
    c, g, eager, ref64, sdpa = ref
    return grads.GradRun(got, eager, ref64, s.dtype, sdpa, None, (c.q, c.k, c.v, s, c.mask, g, c))


def compare(target, s, ref, got: dict) -> list:
    run = run_of(s, ref, got)
    return [(f"grad_{n}", grads.compare_grad(n, run)) for n in got]


def evidence(target, s, ref, got: dict) -> grads.GradRun:
    return run_of(s, ref, got)


def failing_names(failed: dict) -> list[str]:
    return [f"{n}:grad" for n in failed]


def diagnose(target, runs: dict, failed: dict, passing: list, impl, ctx):
    def suspect(bug, run: grads.GradRun):
        q, k, v, s, mask, g, c = run.inputs
        kw = core.keywords(s, c)
        if "sinks" in kw:
            kw["sinks"] = kw["sinks"].double()
        out = core_gradients(bug.kernel(), q.double(), k.double(), v.double(), s.causal, s.scale, mask, g.double(),
                             **kw)  # fmt: skip
        return dict(zip(("q", "k", "v", "sinks"), out, strict=False))  # sinks: only when given

    names = {n: [ch.removeprefix("grad_") for ch in checks] for n, checks in failed.items()}
    return diagnose_grads(runs, names, "core", None, suspect)
