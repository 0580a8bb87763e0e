"""Comparison and the tolerance policy.

float32: pass when max |impl - HF eager| <= 1e-3 over non-padding rows (the product's promise). Where HF itself is
  off the float64 reference (float32 RoPE angles at positions beyond ~16k), an implementation closer to float64
  than HF also passes: max |impl - ref64| <= 2 max |HF - ref64| + floor.
bfloat16 / float16: the FlashAttention rule: max |impl - ref64| <= 2 max |HF same dtype - ref64| + floor.
floor: the rounding floor of the dtype at the output's scale, as FlashAttention's tests compute it:
  2 max |(ref64 + 0.3 - 0.3 in the dtype) - ref64|.
NaN or Inf anywhere in the output (padding rows included) fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ABS_TOL = 1e-3
MULTIPLIER = 2.0
PRECISION_LIMIT = 10.0  # see docs/precision.md: every built-in and transformers' sdpa path measured, with a margin


@dataclass
class Comparison:
    passed: bool
    max_abs_err: float  # vs HF in the same dtype, non-padding rows
    where: list[int] | None  # [batch, position, channel] of the max
    rmse: float
    max_rel_err: float  # max |diff| / (|ref| + 1% of max |ref|)
    tolerance: float
    rule: str
    err_vs_ref64: float
    hf_err_vs_ref64: float
    nonfinite: int  # count of NaN/Inf in the output, padding rows included
    precision_ratio: float = float("nan")  # max |impl - ref64| / (max |HF - ref64| + floor): 1 = as precise as HF
    imprecise: bool = False  # passes the gate but is more than PRECISION_LIMIT x less precise than transformers


def rounding_floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    r = ref64.to(dtype)
    return 2 * ((r + 0.3 - 0.3).double() - ref64).abs().max().item()


def compare(out, ref, ref64, keep, dtype, abs_tol: float = ABS_TOL, hf_err: float | None = None) -> Comparison:
    """out/ref (B, S, D) in dtype, ref64 float64, keep (B, S) bool: the rows that are compared. abs_tol: the
    float32 gate (1e-3 for outputs of order 1; scaled to a gradient's magnitude for gradients). hf_err: transformers'
    own distance from float64 when it is measured over more than `ref` (gradients: its eager and sdpa paths)."""
    nonfinite = int((~torch.isfinite(out)).sum())
    k = keep[..., None].expand_as(out)
    diff = torch.where(k, (out.double() - ref.double()).abs(), torch.zeros((), dtype=torch.float64))
    if nonfinite:
        diff = torch.nan_to_num(diff, nan=float("inf"))
    flat = int(diff.argmax())
    where = list(torch.unravel_index(torch.tensor(flat), diff.shape))
    max_abs = diff.max().item()
    n = int(k.sum())
    rmse = (diff.square().sum() / max(n, 1)).sqrt().item()
    scale = ref.double().abs().masked_fill(~k, 0)
    rel = (diff / (scale + 0.01 * scale.max() + 1e-30)).max().item()
    e64 = torch.where(k, (out.double() - ref64).abs(), torch.zeros((), dtype=torch.float64)).max().item()
    h64 = torch.where(k, (ref.double() - ref64).abs(), torch.zeros((), dtype=torch.float64)).max().item()
    if hf_err is not None:
        h64 = max(h64, hf_err)
    floor = rounding_floor(ref64.masked_fill(~k, 0), dtype)
    if dtype == torch.float32:
        tol, rule = abs_tol, f"|impl-HF|<={abs_tol:.3g}"
        passed = max_abs <= abs_tol or e64 <= MULTIPLIER * h64 + floor
        if max_abs > abs_tol and passed:
            tol, rule = MULTIPLIER * h64 + floor, f"|impl-ref64|<={MULTIPLIER:g}x|HF-ref64|+floor"
    else:
        tol = MULTIPLIER * h64 + floor
        rule = f"|impl-ref64|<={MULTIPLIER:g}x|HF-ref64|+floor"
        passed = e64 <= tol
    passed = passed and nonfinite == 0
    ratio = e64 / (h64 + floor) if h64 + floor > 0 else (0.0 if e64 == 0 else float("inf"))
    imprecise = passed and ratio > PRECISION_LIMIT
    return Comparison(passed, max_abs, [int(i) for i in where], rmse, rel, tol, rule, e64, h64, nonfinite, ratio,
                      imprecise)  # fmt: skip


def not_run(ref: torch.Tensor, dtype) -> Comparison:
    """The row of a check whose implementation gave no output (a fault): failed, NaN everywhere."""
    return Comparison(False, float("inf"), None, float("inf"), float("inf"), ABS_TOL if dtype == torch.float32
                      else float("nan"), "no output", float("inf"), float("nan"), int(ref.numel()))  # fmt: skip


def within(err: float, tol: float, rule: str) -> Comparison:
    """A check of one number against a bound (a kernel's lse vs float64)."""
    return Comparison(err <= tol, err, None, float("nan"), float("nan"), tol, rule, err, float("nan"), 0)


def skipped(why: str) -> Comparison:
    """The row of a scenario that was not run (the implementation cannot take what it needs): not a pass."""
    return Comparison(False, float("nan"), None, float("nan"), float("nan"), float("nan"), f"skipped: {why}",
                      float("nan"), float("nan"), 0)  # fmt: skip
