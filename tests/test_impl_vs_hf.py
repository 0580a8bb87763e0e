"""Every implementation against transformers' LlamaAttention (eager, explicit causal + padding mask), 1e-3 fp32.

Configs: the exact Llama-3.2-1B shapes (synthetic weights), SmolLM2-135M (real weights), and small MHA / GQA / MQA
configs with head_dim 64 and 128. The largest error seen per implementation is kept in pytest's cache
(`impl/max_abs_err`) for the README table.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_weights

from harness.checkpoints.format import load_fixture
from harness.reference import Reference
from impl import IMPLEMENTATIONS, INTERPRETED_ON_CPU
from impl.naive import attention as naive_attention

TOL = 1e-3
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def small(H, Hkv, d, rope=None, D=256):
    return {
        "hidden_size": D,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "head_dim": d,
        "max_position_embeddings": 131072,
        "rope_parameters": rope or {"rope_type": "default", "rope_theta": 1e4},
    }


CONFIGS = {
    "mha-d64": small(4, 4, 64),
    "gqa-d128": small(8, 2, 128, LLAMA3_ROPE, D=512),
    "mqa-d64": small(4, 1, 64, LLAMA3_ROPE),
}


@pytest.fixture(scope="module")
def cases():
    out = {name: (cfg, random_weights(cfg)) for name, cfg in CONFIGS.items()}
    for fx in ("llama-3.2-1b-synthetic", "smollm2-135m"):
        f = load_fixture(fx)
        out[fx] = (f.config, {k: v.float() for k, v in f.weights.items()})
    return out


@pytest.fixture(scope="module")
def record(request):
    worst: dict[str, float] = {}
    yield worst
    old = request.config.cache.get("impl/max_abs_err", {})
    request.config.cache.set(
        "impl/max_abs_err",
        {k: max(v, old.get(k, 0.0)) for k, v in worst.items()} | {k: v for k, v in old.items() if k not in worst},
    )


def check(record, cases, case, x, pos, mask=None, impls=None):
    config, w = cases[case]
    ref = Reference(config, w)(x, pos, mask)
    keep = mask.bool() if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)  # compare real tokens
    for name in impls or [n for n in IMPLEMENTATIONS if n not in INTERPRETED_ON_CPU]:  # triton: test_triton.py
        with torch.no_grad():
            out = IMPLEMENTATIONS[name](x, w, config=config, position_ids=pos, attention_mask=mask)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all(), f"{name}: NaN/Inf (padding rows included)"
        err = (out - ref)[keep].abs().max().item()
        record[name] = max(record.get(name, 0.0), err)
        assert err <= TOL, f"{name} on {case}: max |impl - HF| = {err:.2e} > {TOL}"


def inputs(B, S, D, seed=0):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("S", [1, 2, 63, 64, 65, 257])
@pytest.mark.parametrize("case", ["mha-d64", "gqa-d128", "mqa-d64", "smollm2-135m", "llama-3.2-1b-synthetic"])
def test_lengths(cases, record, case, S):
    D = cases[case][0]["hidden_size"]
    check(record, cases, case, inputs(1, S, D), torch.arange(S)[None])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gqa-d128", "smollm2-135m", "llama-3.2-1b-synthetic"])
def test_length_1000(cases, record, case):
    D = cases[case][0]["hidden_size"]
    check(record, cases, case, inputs(1, 1000, D, 1), torch.arange(1000)[None])


@pytest.mark.slow
def test_llama_2048(cases, record):
    check(record, cases, "llama-3.2-1b-synthetic", inputs(1, 2048, 2048, 2), torch.arange(2048)[None])


@pytest.mark.parametrize("case", ["gqa-d128", "mqa-d64", "smollm2-135m", "llama-3.2-1b-synthetic"])
def test_left_padding_batch(cases, record, case):
    """Batch 3: full row, 10 padding tokens, and a row of all padding but the last token."""
    B, S = 3, 40
    D = cases[case][0]["hidden_size"]
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :10] = 0
    mask[2, :-1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens, as generate() does
    check(record, cases, case, inputs(B, S, D, 3), pos, mask)


@pytest.mark.parametrize("case", ["gqa-d128", "llama-3.2-1b-synthetic"])
def test_restarting_positions(cases, record, case):
    """Packed documents: positions restart (the mask stays plainly causal, as in the contract)."""
    D = cases[case][0]["hidden_size"]
    pos = torch.cat([torch.arange(50), torch.arange(30), torch.arange(20)])[None]
    check(record, cases, case, inputs(1, 100, D, 4), pos)


@pytest.mark.parametrize("case", ["gqa-d128", "mqa-d64", "llama-3.2-1b-synthetic"])
def test_sparse_positions_over_131072(cases, record, case):
    """Unequal long distances: the only way RoPE frequency bugs show (a constant offset changes nothing)."""
    D = cases[case][0]["hidden_size"]
    g = torch.Generator().manual_seed(5)
    pos = torch.sort(torch.randperm(131072, generator=g)[:96]).values[None]
    check(record, cases, case, inputs(1, 96, D, 5), pos)


def test_real_prompt_input(cases, record):
    f = load_fixture("smollm2-135m")
    x = f.inputs["hidden_states"]
    check(record, cases, "smollm2-135m", x, torch.arange(x.shape[1])[None])


def test_naive_intermediates_are_stages():
    config, w = CONFIGS["gqa-d128"], random_weights(CONFIGS["gqa-d128"])
    x, pos = inputs(1, 12, 512), torch.arange(12)[None]
    out, st = naive_attention(x, w, config=config, position_ids=pos, return_intermediates=True)
    assert set(st) == {"q", "k", "v", "scores", "probs", "context"}
    assert st["scores"].shape == (1, 8, 12, 12) and st["scores"].dtype == torch.float32
    torch.testing.assert_close(st["probs"].sum(-1), torch.ones(1, 8, 12))
    assert st["probs"][0, 0, 0, 1:].abs().max() == 0  # causal
