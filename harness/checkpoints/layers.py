"""What a fixture reads of a checkpoint: one layer's attention tensors under the contract's names, and the hidden
states that layer's attention sees for a prompt.

    read_layer   q/k/v/o_proj (Phi-3's fused qkv_proj split: q rows, then k, then v, as Phi3Attention slices it)
                 and the family's extras (reference/family.py extra_shapes): HF's q_proj.bias, ...,
                 self_attn.q_norm.weight (stored as the checkpoint stores it: Gemma's w, applied as 1 + w), sinks
    layer_input  the embeddings (times sqrt(hidden_size) for Gemma, in the embedding's dtype, as its Model does),
                 the earlier decoder layers run in float32 with the family's own DecoderLayer, each with the mask
                 and rotary table of its layer type, then the layer's input_layernorm (the family's RMSNorm)
"""

from __future__ import annotations

import torch

from harness.checkpoints.format import WEIGHT_NAMES
from harness.checkpoints.sources import Checkpoint
from harness.reference import additive_mask
from harness.reference.family import extra_shapes, family, head_dim, hf_config, window
from harness.reference.rope import rotary


def hf_name(name: str) -> str:
    """The contract's name of a layer tensor -> its name under model.layers.L.self_attn. in an HF checkpoint."""
    if name in WEIGHT_NAMES or name in ("q_norm", "k_norm"):
        return f"{name}.weight"
    return name  # q_proj.bias, ..., sinks


def read_layer(ckpt: Checkpoint, layer: int) -> dict[str, torch.Tensor]:
    c = ckpt.config
    prefix = f"model.layers.{layer}.self_attn."
    if family(c).fused_qkv:
        H, Hkv, d = c["num_attention_heads"], c["num_key_value_heads"], head_dim(c)
        qkv = ckpt.tensor(prefix + "qkv_proj.weight")  # ((H + 2 Hkv) d, hidden)
        if qkv.shape[0] != (H + 2 * Hkv) * d:
            raise ckpt.missing(prefix + "qkv_proj.weight", f" of {(H + 2 * Hkv) * d} rows (it has {qkv.shape[0]})")
        w = dict(zip(("q_proj", "k_proj", "v_proj"), qkv.split([H * d, Hkv * d, Hkv * d]), strict=True))
        w["o_proj"] = ckpt.tensor(prefix + "o_proj.weight")
    else:
        w = {n: ckpt.tensor(prefix + hf_name(n)) for n in WEIGHT_NAMES}
    w |= {n: ckpt.tensor(prefix + hf_name(n)) for n in extra_shapes(c)}
    return {n: t.contiguous() for n, t in w.items()}


def layer_input(ckpt: Checkpoint, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states that layer `layer`'s self_attn sees: input_layernorm of the residual stream, fp32."""
    config = ckpt.config
    fam = family(config)
    cfg = hf_config(config)
    h = ckpt.rows("model.embed_tokens.weight", ids).float()  # (1, S, hidden)
    if fam.embed_scale:  # Gemma's scaled embedding: sqrt(hidden_size) in the embedding's dtype
        h = h * torch.tensor(config["hidden_size"] ** 0.5, dtype=h.dtype)
    S = ids.shape[1]
    pos = torch.arange(S)[None]  # (1, S)
    for i in range(layer):  # the earlier decoder layers in fp32 with the family's own modules
        block = fam.cls("DecoderLayer")(cfg, i).float()
        prefix = f"model.layers.{i}."
        block.load_state_dict({k: ckpt.tensor(prefix + k).float() for k in block.state_dict()})
        mask = additive_mask(S, S, window=window(config, i))
        with torch.no_grad():
            out = block(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary(config, i, cfg)(h, pos))
        h = out[0] if isinstance(out, tuple) else out
    norm = fam.cls("RMSNorm")(config["hidden_size"], eps=cfg.rms_norm_eps)
    norm.weight.data = ckpt.tensor(f"model.layers.{layer}.input_layernorm.weight").float()
    with torch.no_grad():
        return norm(h)
