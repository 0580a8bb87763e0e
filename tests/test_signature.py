"""Precision stages by the error's signature (harness/verify/diagnosis/signature.py): every way of lowering a step,
taken as the implementation, is named with its own stage; an error that is no rounding is left to the general
paths; the overflow rows tell float16 from float32; the held-out precision bugs of the catalog (written as people
write them, never seen by the diagnosis) are named right through verify, and so is a dynamic-NTK layer rescaling at
every length; a layer missing its scale on a fixture whose RoPE it also gets wrong is named `scale`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.bugs import catalog, pipeline
from harness.common import compared_rows
from harness.verify import scenarios
from harness.verify.diagnosis import signature as sg
from harness.verify.plugins import resolve
from harness.verify.run import DTYPES, builtin, resolve_fixtures, verify

QUIET = {"log": lambda *_: None}
ROOT = Path(__file__).resolve().parents[1]

# the held-out precision bugs (and the fixture they show on): their stage must come from a general instrument
HELD_OUT = {
    "softmax_torch_fp16": "smollm2-135m",
    "softmax_fp16_no_max": "smollm2-135m",
    "exp_bf16": "smollm2-135m",
    "pv_matmul_fp16": "smollm2-135m",
    "pv_matmul_bf16": "smollm2-135m",
    "tiled_fp16_row_sum": "smollm2-135m",
    "dynamic_every_length": "rope-dynamic-synthetic",
}
GENERAL = ("signature:", "overflow:", "rope_fit")  # the instruments that name them (Diagnosis.matched)


@pytest.fixture(scope="module")
def smol_cases():
    """Two smollm2 scenarios in float64 with every way's signature: (case inputs, keep, ref64 channels, sims)."""
    fx = resolve_fixtures(["smollm2-135m"])[0]
    w = {k: v.float() for k, v in fx.weights.items()}
    out = []
    for name in ("short", "rope_stress"):
        x, pos, mask = scenarios.BY_NAME[name].build(fx, torch.float32)
        case = sg.layer_case(fx.config, w, x, pos, mask)
        keep = compared_rows(x, mask)[..., None].expand(-1, -1, len(sg.channels(x.shape[-1])))
        out.append((fx, w, x, pos, mask, case, keep, sg.signatures(case, keep, sg.WAYS)))
    return out


def test_each_way_of_lowering_is_named_with_its_stage(smol_cases):
    """Each (way, dtype) taken as the observed error (plus float32-sized noise) is explained by its own stage and
    dtype, at R^2 near 1. (An unshifted exp overflows on rope_stress's scores: a NaN is no signature, overflow_dtype
    names those.)"""
    g = torch.Generator().manual_seed(0)
    wrong = []
    for key, (stage, _, _) in ((k, sg.WAYS[k[0]]) for k in smol_cases[0][-1]):
        if not all(torch.isfinite(c[-1][key]).all() for c in smol_cases):
            assert "unshifted" in key[0], key
            continue
        observed = []
        for *_, sims in smol_cases:
            e = sims[key]
            observed.append(e + 1e-3 * e.norm() / e.numel() ** 0.5 * torch.randn(e.shape, generator=g, dtype=e.dtype))
        found = sg.explain(observed, [c[-1] for c in smol_cases])
        if found is None or (found.stage, found.to) != (stage, key[1]) or found.r2 < 0.9:
            wrong.append((key, found and (found.stage, found.to, round(found.r2, 3))))
    assert not wrong, wrong


def test_an_error_that_is_no_rounding_is_left_general(smol_cases):
    """A missing scale and a skipped causal mask leave errors no rounding explains: no stage from the signature."""
    for name in ("scale_missing", "causal_missing", "rope_interleaved"):
        fn = catalog.pick(name).layer()
        observed = []
        for fx, w, x, pos, mask, case, keep, _ in smol_cases:
            out = fn(x, w, config=fx.config, position_ids=pos, attention_mask=mask)[..., sg.channels(x.shape[-1])]
            observed.append((out.double() - case.run(frozenset(), None))[keep])
        assert sg.explain(observed, [c[-1] for c in smol_cases]) is None, name


def test_overflow_rows_tell_the_dtype():
    s = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    s[0, 1, 1, 0] = 50.0  # past float16's 11.09, short of float32's 88.72
    s[0, 0, 3, 2] = 100.0  # past both
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    keep = torch.ones(1, 4, dtype=torch.bool)
    rows = torch.tensor([[False, True, False, True]])
    assert sg.overflow_dtype(s, allowed, rows, keep) == torch.float16
    assert sg.overflow_dtype(s, allowed, torch.tensor([[False, False, False, True]]), keep) == torch.float32
    assert sg.overflow_dtype(s, allowed, torch.tensor([[True, False, False, False]]), keep) is None
    s[0, 0, 0, 3] = 1000.0  # a masked (future) score: never counted
    assert sg.overflow_dtype(s, allowed, rows, keep) == torch.float16


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HELD_OUT))
def test_held_out_precision_bugs_are_named_from_their_signature(name):
    """Through verify, as `make mutants` runs them (every dtype, the quick scenarios here): the expected stage, from
    a general instrument, never from a catalog entry."""
    bug = catalog.pick(name)
    assert bug.held_out
    _, (v,) = verify(resolve_fixtures([HELD_OUT[name]]), [(name, bug.layer())], set(DTYPES.values()), quick=True,
                     **QUIET)  # fmt: skip
    assert not v.passed or v.imprecise, v
    assert v.stage == bug.stage and v.matched.startswith(GENERAL), (v.stage, v.matched, v.hint)


@pytest.mark.parametrize("name", ["softmax_torch_fp16", "pv_matmul_bf16", "exp_bf16"])
def test_a_kernel_is_named_by_its_signature(name):
    """The same bugs as kernels (the core contract), on the kernel matrix."""
    bug = catalog.pick(name)
    _, (v,) = verify([], [builtin(name, bug.kernel(), "core")], {torch.float32}, quick=True, **QUIET)
    assert v.stage == bug.stage and (v.imprecise or not v.passed), (v.stage, v.matched, v.hint)
    assert v.matched.startswith("signature:"), v.matched


@pytest.mark.slow
def test_a_missing_scale_is_named_scale_where_rope_is_wrong_too():
    """docs/examples/user-repo/attn.py lacks the 1/sqrt(d) scale and, on Llama-3.2-1B's config, the llama3 RoPE
    scaling too: no single suspect explains every scenario, but RoPE off (all positions 0) shows the scale alone."""
    impl = resolve(str(ROOT / "docs" / "examples" / "user-repo" / "attn.py") + ":attention")
    _, (v,) = verify(resolve_fixtures(["llama-3.2-1b-synthetic"]), [impl], {torch.float32}, quick=True, **QUIET)
    assert v.stage == "scale" and v.matched == "scale_fit:rope_off", (v.stage, v.hint)
    assert "8x too large" in v.hint and "second problem" in v.hint


def test_the_pipeline_in_float64_is_the_signatures_baseline(smol_cases):
    """The unrounded Case is the textbook pipeline in float64 (the signatures are measured from it)."""
    for fx, w, x, pos, mask, case, keep, _ in smol_cases:
        want = pipeline.float64(pipeline.layer(), x, w, pos, mask, fx.config)[..., sg.channels(x.shape[-1])]
        assert float((case.run(frozenset(), None) - want)[keep].abs().max()) < 1e-9
