"""Meta's original format: consolidated.00.pth + params.json (the `original/` folder of meta-llama repos).

The .pth is a pickle: read with torch.load(weights_only=True, mmap=True), which refuses code objects.
wq/wk rows are in Meta's interleaved RoPE order and are permuted to HF's half-split order.
params.json does not carry the llama3 RoPE scaling factor (Meta's reference code hard-codes 8; Llama 3.2
uses 32), so with use_scaled_rope the RoPE settings must come from the HF config.json of the snapshot
that holds original/, or from --config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import UserError
from harness.sources.base import Checkpoint, encode, hf_tokenizer, interleaved_to_half_split, normalize_config
from harness.sources.local import _cache_identity, read_config

NAMES = {  # HF name -> Meta name
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}


def _to_meta(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        pat = NAMES.get(".".join(parts[:2] + ["{i}"] + parts[3:]))
        return pat.format(i=parts[2]) if pat else None
    return NAMES.get(name)


class MetaCheckpoint(Checkpoint):
    def __init__(self, path: Path, *, config_path: Path | None = None):
        self.dir = Path(path)
        shards = sorted(self.dir.glob("consolidated.*.pth"))
        if len(shards) != 1:
            raise UserError(
                f"{self.dir}: {len(shards)} consolidated.*.pth shards; only single-file Meta checkpoints are read "
                "(convert larger ones to HF format with transformers' convert_llama_weights_to_hf.py)"
            )
        try:
            params = json.loads((self.dir / "params.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.dir / 'params.json'}: not valid JSON ({e.msg}); restore it") from None
        try:
            self.sd = torch.load(shards[0], weights_only=True, mmap=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad pickle
            raise UserError(
                f"{shards[0]}: not a weights-only torch checkpoint ({str(e).splitlines()[0][:120]})"
            ) from None
        hf_cfg_path = Path(config_path) if config_path else self.dir.parent / "config.json"
        if hf_cfg_path.is_file():
            config = normalize_config(read_config(hf_cfg_path), str(hf_cfg_path))
            self._check_against_params(config, params, hf_cfg_path)
            cfg_note = str(hf_cfg_path)
        elif config_path:
            raise UserError(f"{config_path}: no such file; pass the model's HF config.json with --config")
        elif params.get("use_scaled_rope"):
            raise UserError(
                f"{self.dir}/params.json: use_scaled_rope is set but params.json does not carry the llama3 RoPE "
                "factor (Meta's code hard-codes 8, Llama 3.2 uses 32); pass --config PATH to the model's HF "
                "config.json, or extract from the HF snapshot that holds original/"
            )
        else:
            config = normalize_config(self._config_from_params(params), str(self.dir / "params.json"))
            cfg_note = "params.json"
        prov = {"path": str(path), "config_from": cfg_note} | _cache_identity(self.dir.parent)
        name = prov.get("repo_id") or (self.dir.parent.name if self.dir.name == "original" else self.dir.name)
        super().__init__(kind="meta", name=name.split("/")[-1].lower(), config=config, provenance=prov)
        self.files_read = {shards[0].name, "params.json"}

    def _config_from_params(self, p: dict) -> dict:
        w1 = self.sd.get("layers.0.feed_forward.w1.weight")
        emb = self.sd.get("tok_embeddings.weight")
        return {
            "model_type": "llama",
            "hidden_size": p["dim"],
            "num_attention_heads": p["n_heads"],
            "num_key_value_heads": p.get("n_kv_heads") or p["n_heads"],
            "num_hidden_layers": p["n_layers"],
            "head_dim": p["dim"] // p["n_heads"],
            "intermediate_size": int(w1.shape[0]) if w1 is not None else 4 * p["dim"],
            "vocab_size": int(emb.shape[0]) if emb is not None else p.get("vocab_size"),
            "rms_norm_eps": p.get("norm_eps", 1e-5),
            "rope_theta": p.get("rope_theta", 10000.0),
            "max_position_embeddings": p.get("max_seq_len", 4096),
            "tie_word_embeddings": "output.weight" not in self.sd,
        }

    def _check_against_params(self, config: dict, p: dict, where: Path) -> None:
        pairs = {
            "hidden_size": p.get("dim"),
            "num_attention_heads": p.get("n_heads"),
            "num_key_value_heads": p.get("n_kv_heads") or p.get("n_heads"),
            "num_hidden_layers": p.get("n_layers"),
        }
        for key, want in pairs.items():
            if want is not None and config[key] != want:
                raise UserError(
                    f"{where}: {key}={config[key]} but {self.dir}/params.json says {want}; "
                    "pass the config.json that belongs to this checkpoint with --config"
                )
        theta = p.get("rope_theta")
        if theta is not None and float(config["rope_parameters"]["rope_theta"]) != float(theta):
            raise UserError(
                f"{where}: rope_theta={config['rope_parameters']['rope_theta']} but params.json says {theta}; "
                "pass the config.json that belongs to this checkpoint with --config"
            )

    def tensor(self, name: str) -> torch.Tensor:
        mname = _to_meta(name)
        if mname == "output.weight" and mname not in self.sd:
            mname = "tok_embeddings.weight"
        if mname is None or mname not in self.sd:
            raise self.missing(name, f" (Meta name {mname})")
        w = self.sd[mname]
        if mname.endswith("attention.wq.weight"):
            w = interleaved_to_half_split(w, self.config["num_attention_heads"])
        elif mname.endswith("attention.wk.weight"):
            w = interleaved_to_half_split(w, self.config["num_key_value_heads"])
        return w.contiguous()

    def tokenize(self, text: str):
        # Meta's tokenizer.model is tiktoken; the HF tokenizer of the snapshot that holds original/ is the same.
        tok = hf_tokenizer(self.dir.parent)
        return encode(tok, text) if tok is not None else None
