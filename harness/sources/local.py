"""A local directory in Hugging Face format: config.json + model.safetensors (or shards with an index).

An HF cache snapshot (~/.cache/huggingface/hub/models--org--name/snapshots/<sha>) is such a directory;
its repo id and commit sha are read off the path. Only the tensors asked for are read (safetensors mmap).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from harness.errors import UserError
from harness.sources.base import Checkpoint, encode, hf_tokenizer, normalize_config


def read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; an HF checkpoint directory needs its config.json") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}); restore the file") from None


def weight_map(d: Path) -> dict[str, str]:
    """tensor name -> file name, for a single file or a sharded checkpoint."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{index}: not a safetensors index (no weight_map); restore the file") from None
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no *.safetensors weights (only safetensors is read, never pickles)")
    out = {}
    for f in files:
        for name in _open(f).keys():
            out[name] = f.name
    return out


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{f}: unreadable safetensors ({str(e).splitlines()[0]}); re-download it") from None


class LocalHFCheckpoint(Checkpoint):
    def __init__(self, path: Path, *, kind: str = "hf-local", provenance: dict | None = None):
        self.dir = Path(path)
        config = normalize_config(read_config(self.dir / "config.json"), str(self.dir / "config.json"))
        prov = {"path": str(path)} | _cache_identity(self.dir) | (provenance or {})
        name = (prov.get("repo_id") or self.dir.name).split("/")[-1].lower()
        super().__init__(kind=kind, name=name, config=config, provenance=prov)
        self.map = weight_map(self.dir)
        self._handles: dict[str, object] = {}
        self.files_read = {"config.json"}

    def tensor(self, name: str) -> torch.Tensor:
        fn = self.map.get(name)
        if fn is None and name == "lm_head.weight":
            fn = self.map.get("model.embed_tokens.weight")
        if fn is None:
            raise self.missing(name)
        if fn not in self._handles:
            self._handles[fn] = _open(self.dir / fn)
        self.files_read.add(fn)
        try:
            return self._handles[fn].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{self.dir / fn}: cannot read '{name}' ({str(e).splitlines()[0]}); re-download it"
            ) from None

    def tokenize(self, text: str):
        tok = hf_tokenizer(self.dir)
        if tok is None:
            return None
        self.files_read.add("tokenizer.json")
        return encode(tok, text)


def _cache_identity(d: Path) -> dict:
    """repo id and commit from an HF cache snapshot path, if it is one."""
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})/?$", str(d.resolve()))
    if not m:
        return {}
    return {"repo_id": f"{m.group(1)}/{m.group(2)}", "commit_sha": m.group(3)}
