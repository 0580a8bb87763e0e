"""The packed variable-length contract (`--varlen`): FlashAttention's flash_attn_varlen_func convention.

    attn(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None, window=None,
         softcap=0.0, sinks=None) -> out or (out, lse)
    q [total_q, H, d], k, v [total_k, Hkv, d]: the sequences packed one after another, no padding; cu_seqlens int32
    [B + 1] (0, then running totals); per sequence bottom-right causal (query i of sequence b at position
    len_k - len_q + i); no sequence sees another's keys. window, softcap, sinks as --core; out [total_q, H, d] in
    q's dtype, lse [H, total_q] float32 (sink included)

    cases       varlen_cases.py, one target of its own
    reference   per sequence, sliced by the harness, transformers' functions (kernel_hf.py) in the dtype and float64
    compared    out [1, total_q, H*d] (compare.py: NaN anywhere fails); lse within varlen_cases' tolerance
    diagnosis   diagnosis/varlen.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

import impl as builtin_impls
from harness.verify import serve as serve_fns
from harness.verify import varlen_cases
from harness.verify.compare import compare as compare_tensors
from harness.verify.compare import not_run as no_output
from harness.verify.compare import within
from harness.verify.contracts import core
from harness.verify.contracts.layer import check_tensor
from harness.verify.contracts.paged import lse_rule
from harness.verify.diagnosis import varlen as diagnosis
from harness.verify.diagnosis.evidence import maxdiff
from harness.verify.diagnosis.serving import ServingRun
from harness.verify.worker import Fault

NAME = "varlen"
OPTION = "--varlen"
HELP = ("packed variable-length kernels: built-in names or module:function, attn(q, k, v, *, cu_seqlens_q, "
        "cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None, window=None, softcap=0.0, sinks=None) "
        "-> out or (out, lse); a scenario using a keyword the signature lacks is skipped")  # fmt: skip
GRAD = None
FAULT_CHECK = "forward"
SERVE = "harness.verify.serve:varlen"
serve = serve_fns.varlen


@dataclass(frozen=True)
class Matrix:
    """The varlen matrix as a target: the rows' fixture column says `varlen`."""

    name: str = "varlen"


VARLEN = Matrix()
THIS = sys.modules[__name__]


def builtins() -> dict:
    # impl.VARLEN: the built-in varlen kernels (impl/varlen.py); none on a tree without them
    return dict(getattr(builtin_impls, "VARLEN", {}))


def targets(fixtures) -> list[Matrix]:
    return [VARLEN]


def cases(target, ctx, impl) -> list:
    return varlen_cases.select(ctx.dtypes, ctx.quick, slow_kernel=bool(impl is not None and impl.interpreted))


def reference(target, s, ctx, device="cpu") -> varlen_cases.VarlenCase:
    return varlen_cases.reference(s, ctx.cache.setdefault(VARLEN.name, {}))


def run_varlen(impl, x: varlen_cases.VarlenInputs, *, causal=True, scale=None, window=None, softcap=0.0,
               sinks=None):  # fmt: skip
    """-> (out, lse or None), checked against the contract (the diagnosis's probes call it too)."""
    extra, more = core.features(window, softcap, sinks)
    t = {"q": x.q, "k": x.k, "v": x.v, "cu_seqlens_q": x.cu_q, "cu_seqlens_k": x.cu_k} | more
    header = {"causal": causal, "scale": scale, "max_seqlen_q": x.max_q, "max_seqlen_k": x.max_k} | extra
    descs, items = impl.call(THIS, header, t, "running the varlen kernel",
                             expect=x.q.numel() + x.q[..., 0].numel())  # out and lse  # fmt: skip
    return check_output(descs, items, x.q, impl.device)


def check_output(descs: list[dict], items: list, q: torch.Tensor, device=None):
    """out [total_q, H, d] in q's dtype, or (out, lse [H, total_q] float32), on its device; returned where q is."""
    dev = torch.device(device or q.device)
    if len(descs) not in (1, 2) or (len(descs) == 1 and descs[0].get("in_tuple")):
        raise Fault("contract", f"the kernel returned a tuple of {len(descs)}, expected out or (out, lse)")
    check_tensor("the kernel's out", descs[0], items[0], q.shape, q.dtype, dev)
    lse = None
    if len(descs) == 2:
        check_tensor("the kernel's lse", descs[1], items[1], (q.shape[1], q.shape[0]), torch.float32, dev)
        lse = items[1].to(q.device)
    return items[0].to(q.device), lse


def call(impl, target, s, c: varlen_cases.VarlenCase):
    return run_varlen(impl, c.x, causal=s.causal, scale=s.scale, **core.keywords(s, c))


def unsupported(target, s, impl) -> str | None:
    return core.unsupported(target, s, impl)


def not_run(s, c: varlen_cases.VarlenCase):
    return no_output(c.ref, s.dtype)


def lse_error(lse: torch.Tensor, c: varlen_cases.VarlenCase) -> float:
    return maxdiff(lse, c.lse64, c.keep.expand_as(lse))  # lse (H, total_q), keep (1, total_q)


def compare(target, s, c: varlen_cases.VarlenCase, got) -> list:
    out, lse = got
    rows = varlen_cases.rows_of
    checks = [("forward", compare_tensors(rows(out), rows(c.ref), rows(c.ref64), c.keep, s.dtype))]
    if lse is not None:
        checks.append(("lse", within(lse_error(lse, c), c.lse_tol, lse_rule(s.dtype))))
    return checks


def evidence(target, s, c: varlen_cases.VarlenCase, got) -> ServingRun:
    out, lse = got
    return ServingRun(s, c, out, None if lse is None else lse_error(lse, c))


def diagnose(target, runs: dict, failed: dict, passing: list, impl, ctx):
    failing = [n if ch == "forward" else f"{n}:{ch}" for n, checks in failed.items() for ch in checks]
    return diagnosis.diagnose_varlen(runs, failing, passing, lambda x, **kw: run_varlen(impl, x, **kw),
                                 ctx.cache.setdefault(core.KERNELS.name, {}))  # the core matrix's references
