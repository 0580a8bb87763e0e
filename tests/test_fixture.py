"""The fixture format: loading verifies everything, bad fixtures are one line + exit 2, writes are atomic."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES, SMALL, one_line_error, run
from safetensors.torch import load_file, save_file

from harness.checkpoints import format as fx
from harness.checkpoints.extract import extract, hf_self_attn
from harness.common import UserError


def _copy(name: str, tmp_path):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _reseal(d, fn):
    """Update manifest.json's sha256 for a file we changed on purpose, so only the check under test fires."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"][fn] = fx.sha256_file(d / fn)
    (d / "manifest.json").write_text(json.dumps(m))


def test_smollm2_fixture_loads_and_is_real():
    f = fx.load_fixture("smollm2-135m")
    assert not f.synthetic and f.manifest["source"]["kind"] == "gguf"
    c = f.config
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["hidden_size"]) == (9, 3, 64, 576)
    assert f.weights["q_proj"].shape == (576, 576) and f.weights["k_proj"].shape == (192, 576)
    assert f.inv_freq.dtype == torch.float32 and f.inv_freq.shape == (32,)
    assert f.inputs["hidden_states"].dtype == torch.float32 and f.inputs["token_ids"].dtype == torch.int64
    assert f.manifest["license"] == "apache-2.0" and (f.path / "LICENSE.md").is_file()


def test_golden_is_hf_self_attn_today():
    """The stored golden output is what transformers computes now: drift in the reference shows up here."""
    f = fx.load_fixture("smollm2-135m")
    now = hf_self_attn(f.config, f.layer, f.weights, f.inputs["hidden_states"])
    torch.testing.assert_close(now, f.inputs["golden"], rtol=0, atol=1e-5)


def test_inv_freq_is_transformers_llama3():
    cfg = json.loads((FIXTURES / "llama-3.2-1b" / "config.json").read_text())
    from harness.checkpoints.sources.base import normalize_config

    inv = fx.reference_inv_freq(normalize_config(cfg))
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    assert inv.shape == (32,)
    assert torch.equal(inv[:10], base[:10])  # high frequencies untouched by llama3 scaling
    assert torch.allclose(inv[-4:], base[-4:] / 32)  # lowest frequencies divided by factor 32


def test_tampered_fixture_is_one_line_exit_2(tmp_path):
    d = _copy("smollm2-135m", tmp_path)
    raw = bytearray((d / "attn_layer_0.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (d / "attn_layer_0.safetensors").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="sha256"):
        fx.load_fixture(d)
    p = run(["-m", "harness", "fixture", str(d)])
    assert p.returncode == 2
    assert "attn_layer_0.safetensors" in one_line_error(p) and "sha256" in p.stderr


def test_config_that_disagrees_with_weights(tmp_path):
    d = _copy("smollm2-135m", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = 6  # 6 * 64 != 576 rows of q_proj
    (d / "config.json").write_text(json.dumps(cfg))
    _reseal(d, "config.json")
    with pytest.raises(UserError, match="config disagrees"):
        fx.load_fixture(d)


def test_config_rope_edit_is_caught(tmp_path):
    d = _copy("smollm2-135m", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 10000.0
    (d / "config.json").write_text(json.dumps(cfg))
    _reseal(d, "config.json")
    with pytest.raises(UserError, match="inv_freq"):
        fx.load_fixture(d)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"num_key_value_heads": 2}, "not a multiple"),  # 9 % 2
        ({"head_dim": 63}, "even"),
        ({"hidden_size": 0}, "positive integer"),
    ],
)
def test_bad_config_values(tmp_path, edit, match):
    d = _copy("smollm2-135m", tmp_path)
    cfg = json.loads((d / "config.json").read_text()) | edit
    (d / "config.json").write_text(json.dumps(cfg))
    _reseal(d, "config.json")
    with pytest.raises(UserError, match=match):
        fx.load_fixture(d)


def test_nan_weights_are_rejected(tmp_path):
    d = _copy("smollm2-135m", tmp_path)
    fn = d / "attn_layer_0.safetensors"
    t = load_file(fn)
    t["v_proj"][3, 7] = float("nan")
    save_file(t, fn)
    _reseal(d, "attn_layer_0.safetensors")
    with pytest.raises(UserError, match="NaN"):
        fx.load_fixture(d)
    p = run(["-m", "harness", "fixture", str(d)])
    assert p.returncode == 2 and "v_proj" in one_line_error(p)


def test_unknown_fixture_and_config_only_dir():
    with pytest.raises(UserError, match="no fixture"):
        fx.load_fixture("no-such-model")
    if not fx.is_fixture(FIXTURES / "llama-3.2-1b"):  # the real layer has not been extracted here
        with pytest.raises(UserError, match="make extract"):
            fx.load_fixture("llama-3.2-1b")


def _small_config(tmp_path, **edit):
    from checkpoints import LLAMA_3_2_1B_CONFIG

    p = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(LLAMA_3_2_1B_CONFIG | SMALL | {"num_hidden_layers": 2, "vocab_size": 300} | edit))
    return p


def test_atomic_write_survives_interruption(tmp_path, monkeypatch):
    out = tmp_path / "fx"
    cfg = _small_config(tmp_path)
    extract(synthetic=True, config_path=cfg, out=out, log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    calls = {"n": 0}
    real_fsync = fx.os.fsync

    def dying_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # die half-way through writing the new files
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(fx.os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        extract(synthetic=True, config_path=cfg, out=out, seed=1, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    fx.load_fixture(out)


def test_another_model_needs_force(tmp_path):
    out = tmp_path / "fx"
    extract(synthetic=True, config_path=_small_config(tmp_path), out=out, log=lambda *_: None)
    before = fx.sha256_file(out / "attn_layer_0.safetensors")
    other = _small_config(tmp_path, num_key_value_heads=1)
    with pytest.raises(UserError, match="another model.*--force"):
        extract(synthetic=True, config_path=other, out=out, log=lambda *_: None)
    assert fx.sha256_file(out / "attn_layer_0.safetensors") == before
    extract(synthetic=True, config_path=other, out=out, force=True, log=lambda *_: None)
    assert fx.load_fixture(out).config["num_key_value_heads"] == 1


@pytest.mark.slow  # two extractions (keeps make test-fast under its budget)
def test_nan_source_leaves_existing_fixture(tmp_path, small_hf_dir):
    """A corrupt source fails with one line and exit 2; the fixture already there is untouched."""
    src = tmp_path / "nan-src"
    shutil.copytree(small_hf_dir, src)
    t = load_file(src / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "fx"
    extract(str(small_hf_dir), out=out, log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = run(["scripts/extract.py", "--source", str(src), "--out", str(out)])
    assert p.returncode == 2 and "NaN" in one_line_error(p)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_synthetic_llama_fixture_is_labelled_and_exact_config(tmp_path):
    out = tmp_path / "llama-3.2-1b-synthetic"
    extract(synthetic=True, config_path=FIXTURES / "llama-3.2-1b" / "config.json", out=out, log=lambda *_: None)
    f = fx.load_fixture(out)
    assert f.synthetic and f.manifest["source"]["kind"] == "synthetic"
    assert f.weights["q_proj"].shape == (2048, 2048) and f.weights["k_proj"].shape == (512, 2048)
    assert f.weights["q_proj"].dtype == torch.bfloat16
    assert f.config["rope_parameters"]["factor"] == 32.0 and f.config["rope_parameters"]["rope_type"] == "llama3"
    # deterministic: a second extraction is byte-identical
    out2 = tmp_path / "again"
    extract(synthetic=True, config_path=FIXTURES / "llama-3.2-1b" / "config.json", out=out2, log=lambda *_: None)
    for fn in f.manifest["files"]:
        assert fx.sha256_file(out / fn) == fx.sha256_file(out2 / fn), fn
    # realistic softmax: neither uniform nor one-hot on the stored prompt
    assert 0.3 < f.weights["q_proj"].float().std().item() * 2048**0.5 < 3
