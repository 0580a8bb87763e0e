"""The fixture format: one attention layer of a real checkpoint, with its provenance.

fixtures/<name>/
  config.json                 the model's Hugging Face config (transformers 5 form: rope_parameters)
  attn_layer_<L>.safetensors  q_proj [H*d, hidden], k_proj [Hkv*d, hidden], v_proj [Hkv*d, hidden],
                              o_proj [hidden, H*d] (nn.Linear layout, HF half-split RoPE rows, source dtype)
                              and inv_freq [rotary_dim/2] float32 (transformers' rope init for the config)
  inputs.safetensors          token_ids [1, S] int64, hidden_states [1, S, hidden] fp32 (the layer's input),
                              golden [1, S, hidden] fp32 (HF self_attn output for it)
  manifest.json               provenance, shapes, dtypes, sha256 of every file above, versions

`load_fixture` is the one way in: it verifies sha256, shapes against the config and finiteness, and
raises UserError (one line: the file and the fix) on any problem. `write_fixture` is the one way out:
atomic (temp dir, then rename), so a failed run leaves an earlier fixture intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from harness.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = ROOT / "fixtures"
WEIGHT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
FORMAT_VERSION = 1


@dataclass
class Fixture:
    name: str
    path: Path
    config: dict
    layer: int
    weights: dict[str, torch.Tensor]  # q_proj, k_proj, v_proj, o_proj in the source dtype
    inv_freq: torch.Tensor  # [rotary_dim/2] float32
    inputs: dict[str, torch.Tensor] | None  # token_ids, hidden_states, golden (None if the source had none)
    manifest: dict

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("synthetic"))


# ---------------------------------------------------------------------------------------------------------
# config checks


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rotary_dim(config: dict) -> int:
    return int(head_dim(config) * config.get("partial_rotary_factor", 1.0))


def check_config(config: dict, where: str) -> None:
    """The shape facts every attention implementation relies on; one line per violation."""
    fix = "fix the config or re-extract the fixture"
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads"):
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UserError(f"{where}: '{key}' must be a positive integer, got {v!r}; {fix}")
    H, Hkv, d = config["num_attention_heads"], config["num_key_value_heads"], head_dim(config)
    if H % Hkv:
        raise UserError(
            f"{where}: num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv} "
            f"(each KV head must serve a whole group of query heads); {fix}"
        )
    if d % 2 or rotary_dim(config) % 2:
        raise UserError(f"{where}: head_dim={d} must be even for RoPE (pairs of channels rotate); {fix}")
    rp = config.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp or "rope_type" not in rp:
        raise UserError(
            f"{where}: no rope_parameters with rope_type and rope_theta (transformers 5 form); "
            "load it through transformers' LlamaConfig or re-extract the fixture"
        )


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    H, Hkv, d, D = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        head_dim(config),
        config["hidden_size"],
    )
    return {
        "q_proj": (H * d, D),
        "k_proj": (Hkv * d, D),
        "v_proj": (Hkv * d, D),
        "o_proj": (D, H * d),
        "inv_freq": (rotary_dim(config) // 2,),
    }


def reference_inv_freq(config: dict) -> torch.Tensor:
    """The rotary inverse frequencies transformers computes for this config (its rope init functions)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig.from_dict(config)
    rope_type = cfg.rope_parameters["rope_type"]
    fn = (
        LlamaRotaryEmbedding.compute_default_rope_parameters
        if rope_type == "default"
        else ROPE_INIT_FUNCTIONS[rope_type]
    )
    inv_freq, _ = fn(cfg)
    return inv_freq.float()


# ---------------------------------------------------------------------------------------------------------
# reading


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_fixture(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def list_fixtures(root: Path = FIXTURES_DIR) -> list[Path]:
    """Fixture directories under fixtures/ (those with a manifest), sorted by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_fixture(p))


def resolve_fixture(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    for cand in (p, FIXTURES_DIR / str(name_or_path)):
        if cand.is_dir() and is_fixture(cand):
            return cand
        if cand.is_dir() and (cand / "config.json").is_file():
            raise UserError(
                f"{cand}: holds a config but no extracted layer (no manifest.json); run "
                f"`make extract` (or scripts/extract.py --synthetic --config {cand / 'config.json'})"
            )
    known = ", ".join(f.name for f in list_fixtures()) or "none"
    raise UserError(f"no fixture '{name_or_path}' (a name under fixtures/ or a directory); available: {known}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; re-extract the fixture with scripts/extract.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e}); restore or re-extract it"
        ) from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path}: unreadable safetensors ({str(e).splitlines()[0]}); restore or re-extract it"
        ) from None


def load_fixture(name_or_path: str | Path, *, verify: bool = True) -> Fixture:
    """Load and verify a fixture. Every problem is a UserError naming the file and the fix."""
    path = resolve_fixture(name_or_path)
    manifest = _read_json(path / "manifest.json")
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        raise UserError(f"{path / 'manifest.json'}: no 'files' with sha256 digests; re-extract the fixture")
    if verify:
        for fn, digest in sorted(files.items()):
            fp = path / fn
            if not fp.is_file():
                raise UserError(f"{fp}: listed in manifest.json but missing; restore it or re-extract the fixture")
            if sha256_file(fp) != digest:
                raise UserError(
                    f"{fp}: sha256 differs from manifest.json (changed after extraction); "
                    f"restore it (git checkout -- {fp}) or re-extract with scripts/extract.py --force"
                )
    config = _read_json(path / "config.json")
    check_config(config, str(path / "config.json"))
    layer = manifest.get("layer")
    wfile = path / f"attn_layer_{layer}.safetensors"
    if f"attn_layer_{layer}.safetensors" not in files:
        raise UserError(f"{path / 'manifest.json'}: names layer {layer!r} but lists no {wfile.name}; re-extract")
    tensors = _read_tensors(wfile)
    shapes = expected_shapes(config)
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None:
            raise UserError(f"{wfile}: no tensor '{name}'; re-extract the fixture")
        if tuple(t.shape) != shape:
            raise UserError(
                f"{wfile}: '{name}' has shape {list(t.shape)} but config.json implies {list(shape)} "
                "(the config disagrees with the weights); re-extract the fixture"
            )
        if not torch.isfinite(t.float()).all():
            raise UserError(f"{wfile}: '{name}' holds NaN or Inf; the source is corrupt, re-extract the fixture")
    if tensors["inv_freq"].dtype != torch.float32:
        raise UserError(f"{wfile}: 'inv_freq' must be float32, got {tensors['inv_freq'].dtype}; re-extract")
    if verify:
        ref = reference_inv_freq(config)
        if not torch.allclose(tensors["inv_freq"], ref, rtol=1e-6, atol=0):
            raise UserError(
                f"{wfile}: 'inv_freq' disagrees with the rope_parameters in config.json "
                f"({config['rope_parameters']}); the config was edited or the fixture is stale, re-extract it"
            )
    inputs = None
    if "inputs.safetensors" in files:
        inputs = _read_tensors(path / "inputs.safetensors")
        _check_inputs(inputs, config, path / "inputs.safetensors")
    return Fixture(
        name=path.name,
        path=path,
        config=config,
        layer=int(layer),
        weights={n: tensors[n] for n in WEIGHT_NAMES},
        inv_freq=tensors["inv_freq"],
        inputs=inputs,
        manifest=manifest,
    )


def _check_inputs(inputs: dict[str, torch.Tensor], config: dict, where: Path) -> None:
    for key in ("token_ids", "hidden_states", "golden"):
        if key not in inputs:
            raise UserError(f"{where}: no tensor '{key}'; re-extract the fixture")
    S = inputs["token_ids"].shape[-1]
    want = {
        "token_ids": (1, S),
        "hidden_states": (1, S, config["hidden_size"]),
        "golden": (1, S, config["hidden_size"]),
    }
    for key, shape in want.items():
        t = inputs[key]
        if tuple(t.shape) != shape:
            raise UserError(f"{where}: '{key}' has shape {list(t.shape)}, expected {list(shape)}; re-extract")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{where}: '{key}' holds NaN or Inf; re-extract the fixture")


# ---------------------------------------------------------------------------------------------------------
# writing


def identity(config: dict, synthetic: bool) -> dict:
    """What makes two fixtures 'the same model': architecture, RoPE settings and real vs synthetic."""
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size")
    out = {k: config.get(k) for k in keys}
    out["head_dim"] = head_dim(config)
    out["rope_parameters"] = config.get("rope_parameters")
    out["synthetic"] = bool(synthetic)
    return out


def _guard_overwrite(out: Path, config: dict, synthetic: bool, force: bool) -> None:
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    if is_fixture(out):
        try:
            old = json.loads((out / "manifest.json").read_text())
            old_cfg = json.loads((out / "config.json").read_text())
            same = identity(old_cfg, old.get("synthetic", False)) == identity(config, synthetic)
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            raise UserError(
                f"{out}: holds a fixture of another model ({old.get('model', '?')}); "
                "pass --force to replace it or --out to write elsewhere"
            )
        return
    entries = {p.name for p in out.iterdir()}
    if entries - {"config.json"}:
        raise UserError(f"{out}: exists and is not a fixture; pass --force to replace it or choose another --out")
    if "config.json" in entries:  # a shipped config awaiting its layer: it must be the same model
        try:
            shipped = json.loads((out / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            shipped = {}
        ours = identity(config, False)
        theirs = identity(_normalized_or_raw(shipped), False)
        if ours != theirs:
            raise UserError(
                f"{out}/config.json: describes another model than the source; "
                "pass --force to replace it or --out to write elsewhere"
            )


def _normalized_or_raw(config: dict) -> dict:
    if "rope_parameters" in config:
        return config
    try:
        from harness.sources.base import normalize_config

        return normalize_config(config)
    except Exception:  # noqa: BLE001 - only used for a comparison
        return config


def write_fixture(
    out: Path,
    *,
    config: dict,
    layer: int,
    weights: dict[str, torch.Tensor],
    inv_freq: torch.Tensor,
    inputs: dict[str, torch.Tensor] | None,
    manifest: dict,
    extra_files: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write a fixture atomically; returns its path. `manifest` gets files, tensors and format fields added."""
    out = Path(out)
    check_config(config, "config")
    shapes = expected_shapes(config)
    for name in WEIGHT_NAMES:
        if tuple(weights[name].shape) != shapes[name]:
            raise UserError(
                f"source: layer {layer} '{name}' has shape {list(weights[name].shape)} but the config implies "
                f"{list(shapes[name])}; the config does not belong to these weights"
            )
        if not torch.isfinite(weights[name].float()).all():
            raise UserError(f"source: layer {layer} '{name}' holds NaN or Inf; the checkpoint is corrupt")
    _guard_overwrite(out, config, manifest.get("synthetic", False), force)
    out.parent.mkdir(parents=True, exist_ok=True)

    blobs: dict[str, bytes] = {
        "config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        f"attn_layer_{layer}.safetensors": save(
            {**{n: weights[n].contiguous() for n in WEIGHT_NAMES}, "inv_freq": inv_freq.float().contiguous()}
        ),
    }
    if inputs is not None:
        blobs["inputs.safetensors"] = save({k: v.contiguous() for k, v in inputs.items()})
    for fn, text in (extra_files or {}).items():
        blobs[fn] = text.encode()

    tensors = {n: weights[n] for n in WEIGHT_NAMES} | {"inv_freq": inv_freq.float()}
    if inputs is not None:
        tensors |= {f"inputs.{k}": v for k, v in inputs.items()}
    manifest = {
        "format_version": FORMAT_VERSION,
        **manifest,
        "layer": layer,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()
        },
        "files": {fn: hashlib.sha256(b).hexdigest() for fn, b in blobs.items()},
    }
    blobs["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for fn, b in blobs.items():
            with open(tmp / fn, "wb") as f:
                f.write(b)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a fixture is an ordinary directory
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
