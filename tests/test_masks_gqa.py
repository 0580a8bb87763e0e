"""GQA mapping and masks against transformers (repeat_kv, masking_utils); fully masked rows stay finite."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

from impl import IMPLEMENTATIONS, masks
from impl.gqa import group_queries, groups, repeat_kv


@pytest.mark.parametrize("Hkv, g", [(8, 4), (3, 3), (1, 9), (4, 1)])
def test_repeat_kv_equals_transformers(Hkv, g):
    x = torch.randn(2, Hkv, 5, 16)
    assert torch.equal(repeat_kv(x, g), hf_repeat_kv(x, g))
    if g > 1 and Hkv > 1:  # `repeat` (tiling) would be a different mapping: the classic bug
        assert not torch.equal(repeat_kv(x, g), x.repeat(1, g, 1, 1))


def test_group_queries_is_a_view_matching_repeat_kv():
    q, k = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16)
    qg = group_queries(q, 2)
    assert qg.data_ptr() == q.data_ptr() and qg.shape == (1, 2, 4, 5, 16)
    torch.testing.assert_close(
        qg @ k[:, :, None].transpose(-2, -1), (q @ repeat_kv(k, 4).transpose(-2, -1)).view(1, 2, 4, 5, 5)
    )


def test_heads_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple"):
        groups(9, 2)
    config = {
        "hidden_size": 64,
        "num_attention_heads": 3,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    w = {
        "q_proj": torch.randn(48, 64),
        "k_proj": torch.randn(32, 64),
        "v_proj": torch.randn(32, 64),
        "o_proj": torch.randn(64, 48),
    }
    for fn in IMPLEMENTATIONS.values():
        with pytest.raises(ValueError, match="not a multiple"):
            fn(torch.randn(1, 4, 64), w, config=config, position_ids=torch.arange(4)[None])


def _hf_bool_mask(attention_mask, S):
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    cfg._attn_implementation = "eager"
    B = attention_mask.shape[0] if attention_mask is not None else 1
    m = create_causal_mask(
        config=cfg,
        inputs_embeds=torch.zeros(B, S, 64),
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=torch.arange(S).expand(B, S),
    )
    return m == 0  # additive float mask -> True where attention is allowed


@pytest.mark.parametrize("case", ["causal", "left-padding", "right-padding", "almost-all-padding"])
def test_masks_equal_masking_utils(case):
    S = 9
    am = {
        "causal": None,
        "left-padding": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9]),
        "right-padding": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0], [1] * 9]),
        "almost-all-padding": torch.tensor([[0] * 8 + [1], [1] * 9]),
    }[case]
    ours = masks.build(S, S, am).expand(_hf_bool_mask(am, S).shape)
    assert torch.equal(ours, _hf_bool_mask(am, S))


def test_causal_is_bottom_right_aligned_for_decoding():
    m = masks.causal(2, 5)  # two new queries after 3 cached keys
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_fully_masked_rows_give_zeros_not_nan():
    s = torch.randn(1, 1, 3, 4)
    allowed = torch.tensor([[True, False, False, False], [False] * 4, [True] * 4])[None, None]
    p = masks.masked_softmax(s, allowed)
    assert torch.isfinite(p).all()
    assert torch.equal(p[0, 0, 1], torch.zeros(4))
    torch.testing.assert_close(p[0, 0, 2], torch.softmax(s[0, 0, 2], -1))
    assert p[0, 0, 0, 0] == 1


@pytest.mark.slow
def test_impl_never_imports_transformers():
    """Statically (no import statement mentions it) and dynamically (importing impl does not load it)."""
    for path in (ROOT / "impl").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{path}: imports transformers"
    code = "import sys, impl, impl.decode; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
