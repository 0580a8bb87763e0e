"""`make extract` from every local source gives the same tensors transformers reads, exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, SMALL, one_line_error, run
from safetensors.torch import load_file

from harness.checkpoints import format as fx
from harness.checkpoints.extract import extract
from harness.common import UserError
from harness.reference import additive_mask, hf_config

QUIET = {"log": lambda *_: None}


def hf_layer_tensors(hf_dir, layer=0):
    from checkpoints import load_hf_tensors

    t = load_hf_tensors(hf_dir)
    return {n: t[f"model.layers.{layer}.self_attn.{n}.weight"] for n in fx.WEIGHT_NAMES}


def hf_model_layer_input(hf_dir, ids, layer):
    """The layer's self_attn input as transformers' whole LlamaModel computes it (an independent path)."""
    from transformers import LlamaModel

    from harness.checkpoints.sources.local import read_config

    cfg = hf_config(read_config(hf_dir / "config.json"))
    model = LlamaModel.from_pretrained(hf_dir, config=cfg, dtype=torch.float32)
    with torch.no_grad():
        hs = model(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[layer]
        return model.layers[layer].input_layernorm(hs)


# GGUF dequantization + q/k un-permutation == transformers' own GGUF loading: tests/test_e2e.py
# (test_smollm2_cache_matches_the_committed_fixture, on the model transformers loaded from the same file)


@pytest.mark.slow
def test_committed_smollm2_equals_fresh_extraction(tmp_path):
    out = tmp_path / "smollm2-135m"
    p = run(["scripts/extract.py", "--source", "smollm2", "--out", str(out)])
    assert p.returncode == 0, p.stderr
    committed = json.loads((FIXTURES / "smollm2-135m" / "manifest.json").read_text())["files"]
    fresh = json.loads((out / "manifest.json").read_text())["files"]
    assert fresh.keys() == committed.keys()
    for name in fresh.keys() - {"inputs.safetensors"}:  # config, weights, licence note: byte for byte
        assert fresh[name] == committed[name], name
    # The inputs: token ids and layer input exactly; the golden output is a float32 matmul chain whose last bit
    # depends on the CPU's kernels (measured: 1 ulp, 2.4e-7, between two x86 machines), so within 1e-6.
    a = load_file(FIXTURES / "smollm2-135m" / "inputs.safetensors")
    b = load_file(out / "inputs.safetensors")
    assert torch.equal(a["token_ids"], b["token_ids"]) and torch.equal(a["hidden_states"], b["hidden_states"])
    torch.testing.assert_close(b["golden"], a["golden"], rtol=0, atol=1e-6)


def test_local_hf_dir_exact(tmp_path, small_hf_dir):
    out = extract(str(small_hf_dir), out=tmp_path / "fx", **QUIET)
    f = fx.load_fixture(out)
    for n, w in hf_layer_tensors(small_hf_dir).items():
        assert w.dtype == torch.bfloat16 and torch.equal(f.weights[n], w), n
    assert f.manifest["source"]["kind"] == "hf-local" and not f.synthetic
    assert "tokenizer.json" in f.manifest["source"]["files_read"]
    want = hf_model_layer_input(small_hf_dir, f.inputs["token_ids"], 0)
    torch.testing.assert_close(f.inputs["hidden_states"], want, rtol=0, atol=1e-6)


def test_layer_1_input_runs_earlier_layers(tmp_path, small_hf_dir):
    out = extract(str(small_hf_dir), layer=1, out=tmp_path / "fx1", **QUIET)
    f = fx.load_fixture(out)
    assert f.layer == 1 and (out / "attn_layer_1.safetensors").is_file()
    for n, w in hf_layer_tensors(small_hf_dir, 1).items():
        assert torch.equal(f.weights[n], w), n
    want = hf_model_layer_input(small_hf_dir, f.inputs["token_ids"], 1)
    torch.testing.assert_close(f.inputs["hidden_states"], want, rtol=1e-5, atol=1e-5)


def test_sharded_equals_single(tmp_path):
    from checkpoints import make_hf_checkpoint

    single = make_hf_checkpoint(tmp_path / "single", config_overrides=SMALL, num_layers=3)
    shard = make_hf_checkpoint(tmp_path / "shard", config_overrides=SMALL, num_layers=3, sharded=True)
    assert (shard / "model.safetensors.index.json").is_file()
    a = extract(str(single), layer=2, out=tmp_path / "a", **QUIET)
    b = extract(str(shard), layer=2, out=tmp_path / "b", **QUIET)
    for fn in ("attn_layer_2.safetensors", "inputs.safetensors", "config.json"):
        assert fx.sha256_file(a / fn) == fx.sha256_file(b / fn), fn


def test_hf_cache_snapshot_and_offline_cache_hit(tmp_path, hf_env, small_hf_dir, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_env / "models--meta-llama--Llama-3.2-1B"
    snap = repo / "snapshots" / sha
    shutil.copytree(small_hf_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    f = fx.load_fixture(extract(str(snap), out=tmp_path / "a", **QUIET))
    assert f.manifest["source"]["repo_id"] == "meta-llama/Llama-3.2-1B" and f.manifest["source"]["commit_sha"] == sha
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = fx.load_fixture(extract("hf:meta-llama/Llama-3.2-1B", out=tmp_path / "b", **QUIET))
    assert g.manifest["source"]["kind"] == "hf-cache" and g.manifest["bytes_downloaded"] == 0
    assert g.manifest["files"]["attn_layer_0.safetensors"] == f.manifest["files"]["attn_layer_0.safetensors"]


def test_offline_default_source_is_one_line_exit_2(tmp_path, hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = run(["scripts/extract.py", "--out", str(tmp_path / "x")])
    assert p.returncode == 2
    line = one_line_error(p)
    assert "HF_HUB_OFFLINE" in line and "Llama-3.2-1B" in line and "--source" in line
    assert not (tmp_path / "x").exists()


def test_meta_format_gives_hf_tensors_exactly(tmp_path, small_hf_dir):
    from checkpoints import hf_to_meta

    hf = tmp_path / "snapshot"
    shutil.copytree(small_hf_dir, hf)
    hf_to_meta(hf, hf / "original")
    a = fx.load_fixture(extract(str(hf), out=tmp_path / "from-hf", **QUIET))
    b = fx.load_fixture(extract(str(hf / "original"), out=tmp_path / "from-meta", **QUIET))
    assert b.manifest["source"]["kind"] == "meta"
    for n in fx.WEIGHT_NAMES:
        assert torch.equal(a.weights[n], b.weights[n]), n
    assert torch.equal(a.inputs["golden"], b.inputs["golden"])  # attention outputs agree
    assert a.config == b.config


def test_meta_without_config_refuses_then_accepts_config(tmp_path, small_hf_dir):
    from checkpoints import hf_to_meta

    meta = hf_to_meta(small_hf_dir, tmp_path / "alone")  # no config.json beside it
    p = run(["scripts/extract.py", "--source", str(meta), "--out", str(tmp_path / "x")])
    assert p.returncode == 2
    line = one_line_error(p)
    assert "--config" in line and "32" in line
    f = fx.load_fixture(extract(str(meta), config_path=small_hf_dir / "config.json", out=tmp_path / "y", **QUIET))
    assert f.config["rope_parameters"]["factor"] == 32.0


def test_meta_config_that_disagrees(tmp_path, small_hf_dir):
    from checkpoints import hf_to_meta

    meta = hf_to_meta(small_hf_dir, tmp_path / "m")
    cfg = json.loads((small_hf_dir / "config.json").read_text()) | {"rope_theta": 10000.0}
    (tmp_path / "wrong.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rope_theta"):
        extract(str(meta), config_path=tmp_path / "wrong.json", out=tmp_path / "y", **QUIET)


def test_golden_uses_an_explicit_causal_mask(tmp_path, small_hf_dir):
    """Golden must be causal: changing a later token must not change earlier outputs."""
    f = fx.load_fixture(extract(str(small_hf_dir), out=tmp_path / "fx", **QUIET))
    from harness.checkpoints.extract import hf_self_attn

    h = f.inputs["hidden_states"].clone()
    h[:, -1] += 1.0
    out = hf_self_attn(f.config, 0, f.weights, h)
    torch.testing.assert_close(out[:, :-1], f.inputs["golden"][:, :-1], rtol=0, atol=1e-6)
    assert additive_mask(3, 3)[0, 0, 0, 1] < -1e30


@pytest.mark.parametrize(
    "args, match",
    [
        (["--source", "/no/such/dir"], "neither"),
        (["--source", "hf:not-a-repo-id"], "OWNER/NAME"),
        (["--synthetic"], "--config"),
        (["--layer", "x"], "--layer x: give a whole number between 0 and 65535"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, args, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = run(["scripts/extract.py", *args, "--out", str(tmp_path / "x")])
    assert p.returncode == 2, p.stderr
    assert match in one_line_error(p)


def test_layer_out_of_range_is_one_line_exit_2(small_hf_dir, tmp_path):
    p = run(["scripts/extract.py", "--source", str(small_hf_dir), "--layer", "99", "--out", str(tmp_path / "fx")])
    assert p.returncode == 2 and "--layer 99 is out of range: the model has layers 0..1" in one_line_error(p)
    assert not (tmp_path / "fx").exists()
