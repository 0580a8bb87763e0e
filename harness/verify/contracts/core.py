"""The kernel contract (`--core`): the attention between the projections and o_proj.

    attn(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None)
        -> out or (out, lse)
    q [B, H, Sq, d], k and v [B, Hkv, Sk, d], causal bottom-right aligned, attention_mask None or [B, Sk] of
    1 = key; window (left, right) as FlashAttention's window_size (-1 unbounded); softcap: scores become
    softcap * tanh(scores / softcap) after the scale (0 = off); sinks float32 [H], one logit per query head in the
    softmax's denominator with no value; out in q's dtype, lse [B, H, Sq] float32 natural log of the whole
    denominator, sink included (checked when returned)

    the call    window, softcap and sinks are passed only when the scenario uses them: a kernel without them runs
                the other scenarios; a scenario using a keyword its signature lacks is skipped, with the reason
                (`unsupported`): never a pass, a failure under --strict
    cases       the kernel matrix (verify/kernels.py), one target of its own
    reference   transformers' own functions (verify/kernel_hf.py), in the dtype and in float64
    compared    out [B, Sq, H*d] over rows that see a key (compare.py); lse within kernels.LSE_TOL of float64
    diagnosis   diagnosis/kernel.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from harness.verify import kernels
from harness.verify import serve as serve_fns
from harness.verify.compare import compare as compare_tensors
from harness.verify.compare import not_run as no_output
from harness.verify.compare import within
from harness.verify.contracts.layer import check_tensor
from harness.verify.diagnosis import kernel as diagnosis
from harness.verify.worker import Fault
from impl import CORES

NAME = "core"
OPTION = "--core"
HELP = ("kernels: built-in names or module:function, attn(q, k, v, *, causal=True, scale=None, attention_mask=None, "
        "window=None, softcap=0.0, sinks=None) -> out or (out, lse); a scenario using a keyword the signature lacks "
        "is skipped")  # fmt: skip
GRAD = "core_grad"
FAULT_CHECK = "forward"
SERVE = "harness.verify.serve:core"
serve = serve_fns.core


@dataclass(frozen=True)
class Matrix:
    """The kernel matrix as a target: the rows' fixture column says `kernels`."""

    name: str = "kernels"


KERNELS = Matrix()
THIS = sys.modules[__name__]  # the contract whose serve() runs the kernel


def builtins() -> dict:
    return CORES


def targets(fixtures) -> list[Matrix]:
    return [KERNELS]


def cases(target, ctx, impl) -> list:
    return kernels.select(ctx.dtypes, ctx.quick, slow_kernel=bool(impl is not None and impl.interpreted))


def reference(target, s, ctx, device="cpu") -> kernels.KernelCase:
    return kernels.reference(s, ctx.cache.setdefault(KERNELS.name, {}))


def features(window=None, softcap=0.0, sinks=None) -> tuple[dict, dict]:
    """(header, tensors) carrying the optional keywords that are set, and only those (serve.py passes them on)."""
    header = ({} if window is None else {"window": list(window)}) | ({"softcap": float(softcap)} if softcap else {})
    return header, ({} if sinks is None else {"sinks": sinks})


def run_kernel(impl, q, k, v, *, causal=True, scale=None, mask=None, window=None, softcap=0.0, sinks=None):
    """-> (out, lse or None), checked, where q is (the kernel diagnosis's probes call it too). window, softcap and
    sinks reach the kernel only when set."""
    extra, more = features(window, softcap, sinks)
    t = {"q": q, "k": k, "v": v} | ({} if mask is None else {"attention_mask": mask}) | more
    descs, items = impl.call(THIS, {"causal": causal, "scale": scale} | extra, t, "running the kernel",
                             expect=q.numel() + q[..., 0].numel())  # out and lse  # fmt: skip
    return check_output(descs, items, q, impl.device)


def keywords(s: kernels.KernelScenario, c: kernels.KernelCase) -> dict:
    """The scenario's optional keywords, as run_kernel takes them (window, softcap, sinks; unset ones absent)."""
    return ({"window": s.window} if s.window is not None else {}) | ({"softcap": s.softcap} if s.softcap else {}) \
        | ({"sinks": c.sinks} if c.sinks is not None else {})


def call(impl, target, s, c: kernels.KernelCase):
    return run_kernel(impl, c.q, c.k, c.v, causal=s.causal, scale=s.scale, mask=c.mask, **keywords(s, c))


def unsupported(target, s: kernels.KernelScenario, impl) -> str | None:
    """Why this scenario is skipped for this kernel (a keyword it uses is not in the kernel's signature), or None."""
    missing = [f"`{kw}`" for kw in s.uses() if not impl.accepts(kw)]
    if not missing:
        return None
    return f"no {', '.join(missing)} keyword{'s' if len(missing) > 1 else ''} in its signature"


def check_output(descs: list[dict], items: list, q: torch.Tensor, device=None):
    """out [B, H, Sq, d] in q's dtype, or (out, lse [B, H, Sq] float32), on its device; returned where q is."""
    dev = torch.device(device or q.device)
    if len(descs) not in (1, 2) or (len(descs) == 1 and descs[0].get("in_tuple")):
        raise Fault("contract", f"the kernel returned a tuple of {len(descs)}, expected out or (out, lse)")
    check_tensor("the kernel's out", descs[0], items[0], q.shape, q.dtype, dev)
    lse = None
    if len(descs) == 2:
        check_tensor("the kernel's lse", descs[1], items[1], q.shape[:3], torch.float32, dev)
        lse = items[1].to(q.device)
    return items[0].to(q.device), lse


def not_run(s, c: kernels.KernelCase):
    return no_output(c.ref, s.dtype)


def compare(target, s, c: kernels.KernelCase, got) -> list:
    out, lse = got
    checks = [("forward", compare_tensors(kernels.rows_of(out), kernels.rows_of(c.ref), kernels.rows_of(c.ref64),
                                          c.keep, s.dtype))]  # fmt: skip
    if lse is not None:
        rule = "|lse-lse64|<=1e-3" if s.dtype == torch.float32 else "|lse-lse64|<=2x|HF-lse64|+1e-3"
        checks.append(("lse", within(kernels.lse_error(lse, c), c.lse_tol, rule)))
    return checks


def evidence(target, s, c: kernels.KernelCase, got) -> diagnosis.KernelRun:
    out, lse = got
    return diagnosis.KernelRun(s, c, out, None if lse is None else kernels.lse_error(lse, c))


def diagnose(target, runs: dict, failed: dict, passing: list, impl, ctx):
    failing = [n if ch == "forward" else f"{n}:{ch}" for n, checks in failed.items() for ch in checks]
    return diagnosis.diagnose_kernel(runs, failing, passing, lambda *a, **kw: run_kernel(impl, *a, **kw))


def diagnose_precision(target, runs: dict, imprecise: list, impl, ctx):
    return diagnosis.diagnose_precision(runs, imprecise)

