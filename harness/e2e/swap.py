"""The module that stands in for each layer's self_attn, and the context manager that swaps it in and out."""

from __future__ import annotations

import torch
from torch import nn

from harness.checkpoints.format import WEIGHT_NAMES
from harness.reference.family import extra_shapes, layer_config
from harness.verify.contracts.layer import forward as layer_forward
from harness.verify.plugins import Builtin, Impl
from impl import decode
from impl.decode import KVCache


def attn_params(attn: nn.Module, config: dict) -> dict[str, nn.Parameter]:
    """A layer's attention parameters under the contract's names: q/k/v/o_proj and the family's extras
    (reference/family.py extra_shapes: q/k/v/o_proj.bias, q_norm and k_norm as the module stores them, Gemma's w
    applied as 1 + w, sinks), the module's own Parameters (training updates them in place)."""
    out = {n: getattr(attn, n).weight for n in WEIGHT_NAMES}
    for n in extra_shapes(config):
        if n.endswith(".bias"):
            out[n] = getattr(attn, n.removesuffix(".bias")).bias
        elif n in ("q_norm", "k_norm"):
            out[n] = getattr(attn, n).weight
        else:  # sinks: a Parameter of the attention module itself
            out[n] = getattr(attn, n)
    return out


class Swapped(nn.Module):
    """One layer's self_attn, computed by an implementation with that layer's own weights and config (the model's,
    plus layer_idx and layer_type, as the layer contract hands them: a sliding layer's window, Gemma 3's rope
    parameters per layer type follow from it).

    mode "contract": the implementation (an Impl: a layer or a module, user code in its worker process) on the
                     whole sequence so far (the contracts have no cache); only the new rows of its output are
                     returned.
    mode "kv":       impl.decode.step(core, ...) with the project's KV cache: only the new tokens are projected.
    The padding mask [B, T + S_new] (1 = token, 0 = padding) comes from the run (HF passes its own 4-D form).
    """

    def __init__(self, hf_attn: nn.Module, layer: int, run: swapped):
        super().__init__()
        self.layer, self.run, self.config = layer, run, layer_config(run.config, layer)
        self.weights = {n: w.detach() for n, w in attn_params(hf_attn, self.config).items()}
        self.xs = self.pos = None  # contract mode: the inputs seen so far, (B, T, D) and (B, T)

    def forward(self, hidden_states, position_ids=None, **_):
        run, x, pos = self.run, hidden_states, position_ids  # (B, S_new, D), (B, S_new)
        if run.mode == "kv":
            out = decode.step(run.fn, x, self.weights, config=self.config, position_ids=pos, cache=run.cache,
                              layer=self.layer, attention_mask=run.mask)  # fmt: skip
            return out, None
        if self.xs is not None:
            x = torch.cat((self.xs, x), dim=1)  # (B, T + S_new, D)
            pos = torch.cat((self.pos, pos), dim=1)  # (B, T + S_new)
        self.xs, self.pos = x, pos
        out = layer_forward(run.impl, f"layer{self.layer}", self.config, self.weights, x, pos, run.mask)
        return out[:, -hidden_states.shape[1] :], None  # (B, S_new, D): the new rows only


class swapped:
    """Context manager: every layer's self_attn replaced by a Swapped; the originals restored on exit."""

    def __init__(self, model, fn, mode: str = "contract"):
        """fn: an Impl or a layer function (run in this process) for "contract"; a core kernel for "kv"."""
        self.model, self.fn, self.mode, self.config = model, fn, mode, model.config
        if mode == "contract":
            self.impl = fn if isinstance(fn, Impl) else Builtin(getattr(fn, "__name__", "fn"), "layer", fn)
        self.cache = KVCache() if mode == "kv" else None
        self.mask = None  # set by greedy() before every forward; None when nothing is padded

    def __enter__(self):
        self.orig = [layer.self_attn for layer in self.model.layers]
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = Swapped(self.orig[i], i, self)
        return self

    def __exit__(self, *exc):
        for layer, attn in zip(self.model.layers, self.orig, strict=True):
            layer.self_attn = attn
        return False
