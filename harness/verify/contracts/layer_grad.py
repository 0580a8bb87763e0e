"""The gradients of a layer or module (`--grad`), run after its forward passes: gradients of sum(out * g) w.r.t. x
and the four weights, against the family's transformers attention module through autograd (verify/grads.py: the
references and the rule), diagnosed by diagnosis/grad.py."""

from __future__ import annotations

import sys

import torch

from harness.checkpoints.format import Fixture
from harness.checkpoints.sources.base import interleaved_to_half_split
from harness.reference import has_sdpa_path
from harness.verify import grads
from harness.verify import serve as serve_fns
from harness.verify.compare import not_run as no_output
from harness.verify.contracts import layer
from harness.verify.contracts.layer import check_tensor, contract_error, in_layout, rope_heads, weights_in
from harness.verify.diagnosis.grad import diagnose_grads
from harness.verify.serve import GRAD_OF, layer_gradients
from harness.verify.worker import Fault

NAME = "layer_grad"
OPTION = None
HELP = "the gradients of a layer or module"
GRAD = None
FAULT_CHECK = "grad"
SERVE = "harness.verify.serve:layer_grad"
serve = serve_fns.layer_grad
THIS = sys.modules[__name__]  # the contract whose serve() computes the gradients


def builtins() -> dict:
    return layer.builtins()


def targets(fixtures):
    return fixtures


def cases(f: Fixture, ctx, impl, forward: list | None = None) -> list:
    names = grads.LAYER_QUICK if ctx.quick else grads.LAYER_FULL
    return [s for s in (forward if forward is not None else layer.cases(f, ctx, impl)) if s.name in names]


def reference(f: Fixture, s, ctx, device="cpu"):
    """(the forward case, g, transformers' gradients eager, in float64, sdpa), once per fixture contents."""
    r = layer.reference(f, s, ctx, device)
    g = grads.seeded_g(r.ref.shape, r.keep, s.dtype)
    key = (f.key, s.name, "grad")
    if key not in ctx.cache:  # transformers through autograd, once per fixture contents and scenario
        w = weights_in(f, s.dtype)
        c = f.layer_config
        ctx.cache[key] = (grads.hf_layer_grads(c, w, r.x, r.pos, r.mask, g, s.dtype),
                          grads.hf_layer_grads(c, f.weights, r.x, r.pos, r.mask, g, s.dtype, float64=True),
                          grads.hf_layer_grads(c, w, r.x, r.pos, r.mask, g, s.dtype, path="sdpa")
                          if has_sdpa_path(c) else None)  # fmt: skip
    return (r, g, *ctx.cache[key])


def layer_grad(impl, key: str, config: dict, weights: dict, x, pos, mask, g, extras: bool = False) -> dict:
    """{"x": ..., "q_proj": ..., ...} (a weight whose gradient does not flow back to the given tensor is absent for
    a module, which copies its weights), checked, where x is. extras: every weight's gradient (the family's q_norm,
    k_norm, biases, sinks too, as e2e --train needs them), not only the four projections'."""
    t = {"x": x, "position_ids": pos, "g": g} | ({} if mask is None else {"attention_mask": mask})
    preload = (key, config, in_layout(weights, config, impl.layout))
    names = [*GRAD_OF[1:], *(n for n in weights if extras and n not in GRAD_OF)]
    header = {"key": key, "kind": impl.contract} | ({"wrt": names} if extras else {})
    descs, items = impl.call(THIS, header, t, "computing gradients", preload)
    wrt = {"x": x, **{n: weights[n] for n in names}}
    got = check_grads(descs, items, wrt, impl.contract, impl.device)
    if impl.layout == "meta":  # its q/k rows (and q/k biases, norms) were in Meta's order: their gradients too
        for name, n in rope_heads(config).items():
            if name in got:
                got[name] = interleaved_to_half_split(got[name], n)
    return got


def check_grads(descs: list[dict], items: list, wrt: dict, contract: str, device=None) -> dict:
    """Gradients as they came back -> {name: tensor} (where the inputs are), each of its input's shape and dtype,
    on the implementation's device."""
    if len(descs) == 1 and len(wrt) > 1:  # the forward output itself, refused
        raise Fault("contract", f"computing gradients: {contract_error('the output', descs[0], 'a tensor').message}")
    out = {}
    for (name, like), d, t in zip(wrt.items(), descs, items, strict=True):
        if d.get("type") == "builtins.NoneType":
            if contract == "module" and name != "x":
                continue  # the module keeps its own copy of this weight: nothing to compare
            raise Fault("contract", f"no gradient reaches {name}: the computation is not differentiable w.r.t. it")
        check_tensor(f"the gradient of {name}", d, t, like.shape, like.dtype, torch.device(device or like.device))
        out[name] = t.to(like.device)
    return out


def call(impl, f: Fixture, s, ref) -> dict:
    r, g = ref[0], ref[1]
    key, config = layer.announced(f, s)  # the forward's key and sizes: a module is built for the same ones
    return layer_grad(impl, key, config, weights_in(f, s.dtype), r.x, r.pos, r.mask, g)


def not_run(s, ref):
    return no_output(ref[0].ref, s.dtype)


def run_of(s, ref, got) -> grads.GradRun:
    r, g, eager, ref64, sdpa = ref
    return grads.GradRun(got, eager, ref64, s.dtype, sdpa, r.keep, (r.x, r.pos, r.mask, g))


def compare(f: Fixture, s, ref, got: dict) -> list:
    run = run_of(s, ref, got)
    return [(f"grad_{n}", grads.compare_grad(n, run)) for n in got]


def evidence(f: Fixture, s, ref, got: dict) -> grads.GradRun:
    return run_of(s, ref, got)


def failing_names(failed: dict) -> list[str]:
    return [f"{n}:grad" for n in failed]


def diagnose(f: Fixture, runs: dict, failed: dict, passing: list, impl, ctx):
    def suspect(bug, run: grads.GradRun):
        x, pos, mask, g = run.inputs
        w = {k: v.double() for k, v in f.weights.items()}
        out = layer_gradients(bug.layer(), "layer", f.layer_config, w, x.double(), pos, mask, g.double())
        return dict(zip(GRAD_OF, out, strict=True))

    names = {n: [ch.removeprefix("grad_") for ch in checks] for n, checks in failed.items()}
    return diagnose_grads(runs, names, "layer", f.layer_config, suspect)

