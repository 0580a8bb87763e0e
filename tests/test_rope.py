"""impl.rope against transformers: frequencies (every rope type), tables, application, both pairings, partial."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from harness.checkpoints.sources.base import normalize_config
from impl import rope
from impl.projection import rope_tables

LLAMA = normalize_config(json.loads((FIXTURES / "llama-3.2-1b" / "config.json").read_text()))
BASE = {
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 4096,
}
ROPES = {
    "llama-3.2-1b": LLAMA,
    "default": BASE | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "default-d128": BASE | {"head_dim": 128, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "linear": BASE | {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    "dynamic": BASE | {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    "yarn": BASE
    | {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    },
    "yarn-mscale": BASE
    | {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 512,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
        }
    },
    "llama3-factor8": BASE
    | {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    },
}


def hf_init(config: dict, seq_len=None):
    cfg = LlamaConfig.from_dict(config)
    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len) if seq_len else ROPE_INIT_FUNCTIONS[kind](cfg)


@pytest.mark.parametrize("name", sorted(ROPES))
def test_inv_freq_bit_identical_to_transformers(name):
    ours, s1 = rope.inv_freq(ROPES[name])
    theirs, s2 = hf_init(ROPES[name])
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs), (ours - theirs).abs().max()
    assert s1 == s2


@pytest.mark.parametrize("seq_len", [100, 4096, 9000, 20000])
def test_dynamic_ntk_at_sequence_lengths(seq_len):
    ours, _ = rope.inv_freq(ROPES["dynamic"], seq_len=seq_len)
    theirs, _ = hf_init(ROPES["dynamic"], seq_len=seq_len)
    assert torch.equal(ours, theirs)


def test_llama3_scaling_is_not_a_noop():
    """Guards the test above: factor 32 vs 8 vs none give different frequencies for Llama-3.2-1B."""
    plain = rope.inv_freq(LLAMA | {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})[0]
    f8 = rope.inv_freq(ROPES["llama3-factor8"] | {"head_dim": 64})[0]
    f32 = rope.inv_freq(LLAMA)[0]
    assert not torch.equal(plain, f32) and not torch.equal(f8, f32)
    assert torch.equal(plain[:8], f32[:8])  # high frequencies untouched


def test_float64_table_is_closer_to_exact():
    inv64, _ = rope.inv_freq(LLAMA, dtype=torch.float64)
    inv32, _ = rope.inv_freq(LLAMA)
    assert inv64.dtype == torch.float64
    torch.testing.assert_close(inv32.double(), inv64, rtol=1e-6, atol=0)


POSITIONS = {
    "contiguous": torch.arange(64)[None],
    "offset": torch.arange(5000, 5064)[None],
    "restarting": torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)])[None],
    "sparse-131072": torch.linspace(0, 131071, 64).long()[None],
    "batch": torch.stack([torch.arange(64), torch.arange(64) * 37 % 9000]),
}


@pytest.mark.parametrize("pos", sorted(POSITIONS))
@pytest.mark.parametrize("name", ["llama-3.2-1b", "default", "linear", "yarn", "dynamic"])
def test_cos_sin_equal_llama_rotary_embedding(name, pos):
    config, p = ROPES[name], POSITIONS[pos]
    cos, sin = rope_tables(config, p)
    hf_cos, hf_sin = LlamaRotaryEmbedding(LlamaConfig.from_dict(config))(torch.zeros(1, dtype=torch.float32), p)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_float32_angles_not_bf16():
    """At long positions bf16 angles lose whole radians; ours are float32 like transformers'."""
    p = torch.tensor([[131071]])
    cos32, _ = rope_tables(LLAMA, p)
    cos64, _ = rope_tables(LLAMA, p, dtype=torch.float64)
    inv, _ = rope.inv_freq(LLAMA)
    bf16_angles = (p.bfloat16()[..., None] * inv.bfloat16()).float()
    bf16_err = (torch.cat([bf16_angles, bf16_angles], -1).cos() - cos64).abs().max()
    assert (cos32.double() - cos64).abs().max() < 0.05 < bf16_err


@pytest.mark.parametrize("name", ["llama-3.2-1b", "yarn-mscale"])
def test_application_equals_apply_rotary_pos_emb(name):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 64, 64, generator=g), torch.randn(2, 2, 64, 64, generator=g)
    cos, sin = rope_tables(ROPES[name], POSITIONS["batch"])
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rope.apply_half(q, cos, sin), hq) and torch.equal(rope.apply_half(k, cos, sin), hk)


def test_interleaved_on_meta_rows_equals_half_split_on_hf_rows():
    """Same scores: Meta-ordered weights with interleaved RoPE == HF-ordered weights with half-split RoPE."""
    from harness.checkpoints.sources.base import interleaved_to_half_split

    g = torch.Generator().manual_seed(1)
    H, d, D, S = 4, 64, 128, 48
    wq_meta, wk_meta = torch.randn(H * d, D, generator=g), torch.randn(H * d, D, generator=g)
    wq_hf, wk_hf = interleaved_to_half_split(wq_meta, H), interleaved_to_half_split(wk_meta, H)
    x = torch.randn(1, S, D, generator=g)
    cos, sin = rope_tables(ROPES["default"], POSITIONS["sparse-131072"][:, :S])

    def scores(wq, wk, apply):
        q = (x @ wq.T).view(1, S, H, d).transpose(1, 2)  # (1, H, S, d)
        k = (x @ wk.T).view(1, S, H, d).transpose(1, 2)
        q, k = apply(q.double(), cos.double(), sin.double()), apply(k.double(), cos.double(), sin.double())
        return q @ k.transpose(-2, -1)

    a = scores(wq_meta, wk_meta, rope.apply_interleaved)
    b = scores(wq_hf, wk_hf, rope.apply_half)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)
    c = scores(wq_hf, wk_hf, rope.apply_interleaved)  # the classic bug: interleaved RoPE on HF rows
    assert (c - b).abs().max() > 1.0


def test_partial_rotary_equals_phi():
    """Partial rotary (rotary_dim < head_dim) against transformers' Phi, which implements it."""
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiRotaryEmbedding
    from transformers.models.phi.modeling_phi import apply_rotary_pos_emb as phi_apply

    pc = PhiConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5)
    config = {
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rope_parameters": dict(pc.rope_parameters),
    }
    d, rd = rope.dims(config)
    assert (d, rd) == (64, 32)
    p = POSITIONS["batch"]
    hcos, hsin = PhiRotaryEmbedding(pc)(torch.zeros(1), p)
    cos, sin = rope_tables(config, p)
    assert torch.equal(cos, hcos) and torch.equal(sin, hsin)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 64, d, generator=g), torch.randn(2, 4, 64, d, generator=g)
    hq, hk = phi_apply(q[..., :rd], k[..., :rd], hcos, hsin)
    torch.testing.assert_close(rope.apply_half(q, cos, sin), torch.cat([hq, q[..., rd:]], -1), rtol=0, atol=0)
    torch.testing.assert_close(rope.apply_half(k, cos, sin), torch.cat([hk, k[..., rd:]], -1), rtol=0, atol=0)


def test_unknown_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="'proportional' is not implemented.*longrope"):
        rope.inv_freq(BASE | {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1.0}})
