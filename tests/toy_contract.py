"""A toy contract, registered from the tests (test_loop.py): identity attention. One query and one key: the
softmax is 1, so attention returns the value. The code under test is `attn(v) -> out`; the reference is
transformers' own eager_attention_forward on that one key. Everything a contract needs, nothing more."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from harness.verify.compare import compare as compare_tensors
from harness.verify.compare import not_run as no_output
from harness.verify.contracts.layer import check_tensor
from harness.verify.diagnosis.evidence import Diagnosis

NAME, OPTION, HELP, GRAD, FAULT_CHECK = "toy", "--toy", "identity attention: attn(v) -> v", None, "forward"
THIS = sys.modules[__name__]


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype


def builtins() -> dict:
    return {"identity": lambda v: v.clone(), "doubled": lambda v: 2 * v, "wrong_shape": lambda v: v[..., :-1],
            "raises": lambda v: 1 / 0}  # fmt: skip


def targets(fixtures):
    return fixtures[:1]


def cases(f, ctx, impl) -> list[Case]:
    return [Case(f"one_key_{str(dt).removeprefix('torch.')}", dt) for dt in (torch.float32, torch.bfloat16)
            if dt in ctx.dtypes]  # fmt: skip


def reference(f, case, ctx, device="cpu"):
    d = f.config["head_dim"]
    v = torch.randn(2, 3, 1, d, generator=torch.Generator().manual_seed(0))  # (B, H, 1, d)
    m = torch.nn.Module()
    m.num_key_value_groups, m.training = 1, False
    outs = [eager_attention_forward(m, t, t, t, None, scaling=d**-0.5)[0] for t in (v.to(case.dtype), v.double())]
    return v.to(case.dtype), *outs  # inputs, transformers in the dtype, in float64: (B, 1, H, d)


def serve(code, header, t, state):
    return code(t["v"])


def call(impl, f, case, ref):
    v = ref[0]
    descs, items = impl.call(THIS, {}, {"v": v}, "running the toy")
    check_tensor("the toy", descs[0], items[0], v.shape, v.dtype, torch.device(impl.device))
    return items[0].transpose(1, 2)  # (B, 1, H, d) as transformers returns it


def not_run(case, ref):
    return no_output(ref[1], case.dtype)


def compare(f, case, ref, out):
    keep = torch.ones(out.shape[:2], dtype=torch.bool)
    return [("forward", compare_tensors(out.flatten(2), ref[1].flatten(2), ref[2].flatten(2), keep, case.dtype))]


def evidence(f, case, ref, out):
    return out, ref[1]


def diagnose(f, runs, failed, passing, impl, ctx):
    out, ref = next(iter(runs.values()))
    ratio = float(out.double().norm() / ref.double().norm())
    return Diagnosis("scale", f"the output is {ratio:.3g}x the value", "norm_ratio")
