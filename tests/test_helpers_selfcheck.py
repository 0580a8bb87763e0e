"""Self-checks for the test helpers tests/hubmock.py and tests/checkpoints.py."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, hf_raise_for_status, http_backoff
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import (  # noqa: E402
    LLAMA_3_2_1B_CONFIG,
    _ffn_params,
    hf_to_meta,
    load_hf_tensors,
    make_hf_checkpoint,
    meta_ffn_hidden_dim,
)
from hubmock import MockHub  # noqa: E402

REPO, GATED = "test-org/tiny-llama", "meta-llama/Llama-3.2-1B"
SMALL = {"hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2}
WEIGHTS = "model-00001-of-00002.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = make_hf_checkpoint(tmp_path_factory.mktemp("hf"), sharded=True, config_overrides=SMALL)
    hf_to_meta(d, d / "original")
    return d


@pytest.fixture()
def hub(ckpt):
    with MockHub({REPO: ckpt, GATED: ckpt}, gated={GATED}) as h:
        yield h


def url(hub, filename, repo=REPO, revision="main"):
    return hf_hub_url(repo, filename, revision=revision, endpoint=hub.url)


# ---------------------------------------------------------------------------------------------------- MockHub
def test_metadata(hub, ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    meta = get_hf_file_metadata(url(hub, WEIGHTS), token=False, endpoint=hub.url)
    assert meta.commit_hash == hub.commit(REPO) == hashlib.sha1(REPO.encode()).hexdigest()
    assert meta.etag == hashlib.sha256(data).hexdigest() and meta.size == len(data)
    assert meta.location == url(hub, WEIGHTS)
    cfg = (ckpt / "config.json").read_bytes()
    meta = get_hf_file_metadata(url(hub, "config.json", revision=hub.commit(REPO)), token=False)
    assert meta.etag == hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest() and meta.size == len(cfg)
    assert get_hf_file_metadata(url(hub, "original/params.json"), token=False).size > 0
    assert hub.bytes_served == 0 and [r["method"] for r in hub.requests] == ["HEAD"] * 3


def test_download_and_ranges(hub, ckpt, tmp_path):
    data = (ckpt / WEIGHTS).read_bytes()
    p = hf_hub_download(REPO, WEIGHTS, endpoint=hub.url, token=False, cache_dir=tmp_path)
    assert Path(p).read_bytes() == data and hub.bytes_served == len(data)
    assert [(r["method"], r["status"]) for r in hub.requests] == [("HEAD", 200), ("GET", 200)]

    hub.reset_counters()
    r = get_session().get(url(hub, WEIGHTS), headers={"Range": "bytes=8-1031"})
    hf_raise_for_status(r)
    assert r.status_code == 206 and r.content == data[8:1032]
    assert r.headers["Content-Range"] == f"bytes 8-1031/{len(data)}"
    r = http_backoff("GET", url(hub, WEIGHTS), headers={"Range": f"bytes={len(data) - 100}-"})
    assert r.status_code == 206 and r.content == data[-100:]
    assert hub.bytes_served == 1124 and hub.requests[0]["range"] == "bytes=8-1031"
    assert [q["body_bytes"] for q in hub.requests] == [1024, 100]

    r = get_session().get(url(hub, WEIGHTS), headers={"Range": f"bytes={len(data)}-"})
    with pytest.raises(HfHubHTTPError) as e:
        hf_raise_for_status(r)
    assert e.value.response.status_code == 416 and hub.bytes_served == 1124


def test_gated(hub, ckpt):
    for token in (False, "hf_wrong"):
        with pytest.raises(GatedRepoError):
            get_hf_file_metadata(url(hub, "config.json", repo=GATED), token=token)
    r = get_session().get(url(hub, "config.json", repo=GATED))
    assert r.status_code == 401 and r.headers["X-Error-Code"] == "GatedRepo"
    with pytest.raises(GatedRepoError, match="restricted"):
        hf_raise_for_status(r)
    meta = get_hf_file_metadata(url(hub, "config.json", repo=GATED), token=hub.token)
    assert meta.commit_hash == hub.commit(GATED)
    r = get_session().get(url(hub, "config.json", repo=GATED), headers={"Authorization": f"Bearer {hub.token}"})
    hf_raise_for_status(r)
    assert r.content == (ckpt / "config.json").read_bytes()
    info = HfApi(endpoint=hub.url).model_info(GATED, token=False)  # metadata is public, as on the Hub
    assert info.gated == "manual" and info.sha == hub.commit(GATED)


def test_not_found_errors(hub, tmp_path):
    with pytest.raises(EntryNotFoundError):
        get_hf_file_metadata(url(hub, "nope.bin"), token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.bin", endpoint=hub.url, token=False, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        get_hf_file_metadata(url(hub, "config.json", revision="v9"), token=False)
    with pytest.raises(RepositoryNotFoundError):
        get_hf_file_metadata(url(hub, "config.json", repo="nobody/nothing"), token=False)
    api = HfApi(endpoint=hub.url, token=False)
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.bin")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")


def test_model_info(hub, ckpt):
    info = HfApi(endpoint=hub.url).model_info(REPO, revision="main", token=False, files_metadata=True)
    names = {s.rfilename: s for s in info.siblings}
    assert info.id == REPO and info.sha == hub.commit(REPO) and info.gated is False
    assert {"config.json", "model.safetensors.index.json", WEIGHTS, "original/params.json"} <= names.keys()
    assert names[WEIGHTS].size == (ckpt / WEIGHTS).stat().st_size
    assert names[WEIGHTS].lfs.sha256 == hashlib.sha256((ckpt / WEIGHTS).read_bytes()).hexdigest()


def test_fail_next(hub, ckpt, tmp_path):
    hub.fail_next(WEIGHTS, 500)
    r = get_session().get(url(hub, WEIGHTS), headers={"Range": "bytes=0-7"})
    with pytest.raises(HfHubHTTPError) as e:
        hf_raise_for_status(r)
    assert e.value.response.status_code == 500
    r = get_session().get(url(hub, WEIGHTS), headers={"Range": "bytes=0-7"})
    assert r.status_code == 206 and r.content == (ckpt / WEIGHTS).read_bytes()[:8]

    hub.fail_next(WEIGHTS, 503, times=2)  # http_backoff retries 5xx
    r = http_backoff("GET", url(hub, WEIGHTS), headers={"Range": "bytes=0-7"}, base_wait_time=0.01)
    assert r.status_code == 206 and [q["status"] for q in hub.requests[-3:]] == [503, 503, 206]

    hub.fail_next("config.json", 500)  # hf_hub_download retries a failed HEAD once, with retries enabled
    p = hf_hub_download(REPO, "config.json", endpoint=hub.url, token=False, cache_dir=tmp_path)
    assert Path(p).read_bytes() == (ckpt / "config.json").read_bytes()


def test_truncate_next(hub, ckpt, tmp_path):
    data = (ckpt / WEIGHTS).read_bytes()
    hub.truncate_next(WEIGHTS)
    with pytest.raises(httpx2.RemoteProtocolError):
        get_session().get(url(hub, WEIGHTS), headers={"Range": "bytes=0-9999"})
    assert hub.bytes_served == 5000 and hub.requests[-1]["body_bytes"] == 5000
    r = get_session().get(url(hub, WEIGHTS), headers={"Range": "bytes=0-9999"})  # the pool recovers
    assert r.content == data[:10000]

    # hf_hub_download retries a truncated body after a 1 s sleep; it resumes with "Range: bytes=N-" from the last
    # 10 MB chunk written (here none was: the file is smaller, so the retry is a plain GET of the whole file).
    hub.reset_counters()
    hub.truncate_next(WEIGHTS)
    p = hf_hub_download(REPO, WEIGHTS, endpoint=hub.url, token=False, cache_dir=tmp_path)
    assert Path(p).read_bytes() == data
    assert [(q["method"], q["status"], q["body_bytes"]) for q in hub.requests] == [
        ("HEAD", 200, 0),
        ("GET", 200, len(data) // 2),
        ("GET", 200, len(data)),
    ]


def test_lfs_redirect(ckpt, tmp_path):
    data = (ckpt / WEIGHTS).read_bytes()
    with MockHub({GATED: ckpt}, gated={GATED}, lfs_redirect=True) as hub:
        meta = get_hf_file_metadata(url(hub, WEIGHTS, repo=GATED), token=hub.token)
        assert meta.location.startswith(f"http://localhost:{hub.port}/cdn/")
        assert meta.size == len(data) and meta.etag == hashlib.sha256(data).hexdigest()
        auth = {"Authorization": f"Bearer {hub.token}"}
        r = get_session().get(url(hub, WEIGHTS, repo=GATED), headers={**auth, "Range": "bytes=3-5"})
        assert r.status_code == 206 and r.content == data[3:6] and len(r.history) == 1
        assert hub.requests[-1]["auth"] is None  # httpx drops Authorization on the cross-origin redirect
        hub.truncate_next(WEIGHTS)  # faults apply on the CDN URL too
        hub.fail_next(WEIGHTS, 500)
        r = get_session().get(url(hub, WEIGHTS, repo=GATED))
        assert r.status_code == 500 and hub.requests[-1]["path"].startswith("/meta-llama/")
        with pytest.raises(httpx2.RemoteProtocolError):
            get_session().get(url(hub, WEIGHTS, repo=GATED), headers=auth)
        assert hub.requests[-1]["path"].startswith("/cdn/") and hub.requests[-1]["body_bytes"] == len(data) // 2
        p = hf_hub_download(GATED, WEIGHTS, endpoint=hub.url, token=hub.token, cache_dir=tmp_path)
        assert Path(p).read_bytes() == data


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_layout(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 512 and cfg["head_dim"] == 32
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    tensors = load_hf_tensors(ckpt)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and "lm_head.weight" not in tensors
    assert index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] == WEIGHTS
    assert index["weight_map"]["model.layers.1.self_attn.q_proj.weight"] == "model-00002-of-00002.safetensors"
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())

    d = make_hf_checkpoint(tmp_path / "full", config_overrides={"intermediate_size": 256})
    cfg = json.loads((d / "config.json").read_text())
    assert {
        k: v
        for k, v in cfg.items()
        if k not in ("num_hidden_layers", "vocab_size", "intermediate_size", "bos_token_id", "eos_token_id")
    } == {
        k: v
        for k, v in LLAMA_3_2_1B_CONFIG.items()
        if k not in ("num_hidden_layers", "vocab_size", "intermediate_size", "bos_token_id", "eos_token_id")
    }
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (2048, 2048)
    assert (
        shapes["model.layers.1.self_attn.k_proj.weight"]
        == shapes["model.layers.0.self_attn.v_proj.weight"]
        == (512, 2048)
    )
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (2048, 2048)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2048, 256)
    assert shapes["model.embed_tokens.weight"] == (512, 2048) and len(shapes) == 2 + 2 * 9


def test_checkpoint_deterministic(ckpt, tmp_path):
    d = make_hf_checkpoint(tmp_path / "again", sharded=True, config_overrides=SMALL)
    names = sorted(p.name for p in ckpt.iterdir() if p.is_file())
    assert names == sorted(p.name for p in d.iterdir())
    assert all((ckpt / n).read_bytes() == (d / n).read_bytes() for n in names)
    hf_to_meta(d, d / "original")
    assert (d / "original/consolidated.00.pth").read_bytes() == (ckpt / "original/consolidated.00.pth").read_bytes()


def test_tokenizer(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("The capital of France is Paris.")["input_ids"]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert ids[0] == tok.bos_token_id == cfg["bos_token_id"] and max(ids) < cfg["vocab_size"] and len(ids) > 3
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is Paris."


def _hf_permute(w, n_heads, dim1, dim2):  # transformers/models/llama/convert_llama_weights_to_hf.py
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_hf_to_meta_roundtrip(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    params = json.loads((ckpt / "original/params.json").read_text())
    assert params["dim"] == 256 and params["n_heads"] == 8 and params["n_kv_heads"] == 2 and params["use_scaled_rope"]
    assert meta_ffn_hidden_dim(params["dim"], params.get("ffn_dim_multiplier"), params["multiple_of"]) == 256
    meta = torch.load(ckpt / "original/consolidated.00.pth", weights_only=True)
    hf = load_hf_tensors(ckpt)
    dim, kv_dim = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    for i in range(2):
        wq, wk = meta[f"layers.{i}.attention.wq.weight"], meta[f"layers.{i}.attention.wk.weight"]
        q, k = hf[f"model.layers.{i}.self_attn.q_proj.weight"], hf[f"model.layers.{i}.self_attn.k_proj.weight"]
        assert not torch.equal(wq, q) and wq.dtype == torch.bfloat16
        assert torch.equal(_hf_permute(wq, 8, dim, dim), q)
        assert torch.equal(_hf_permute(wk, 2, kv_dim, dim), k)
        assert torch.equal(meta[f"layers.{i}.feed_forward.w1.weight"], hf[f"model.layers.{i}.mlp.gate_proj.weight"])
        assert torch.equal(meta[f"layers.{i}.feed_forward.w2.weight"], hf[f"model.layers.{i}.mlp.down_proj.weight"])
        assert torch.equal(meta[f"layers.{i}.attention_norm.weight"], hf[f"model.layers.{i}.input_layernorm.weight"])
    assert torch.equal(meta["output.weight"], hf["model.embed_tokens.weight"])
    assert len(meta) == 3 + 2 * 9


def test_meta_ffn_params():
    assert _ffn_params(2048, 8192) == (1.5, 256)  # the real Llama-3.2-1B params.json
    for dim, inter in [(2048, 256), (256, 512), (256, 1000), (64, 7), (4096, 14336), (3072, 8192)]:
        mult, m = _ffn_params(dim, inter)
        assert meta_ffn_hidden_dim(dim, mult, m) == inter
