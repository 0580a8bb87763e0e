"""`e2e --train`: training a whole real model with the implementation in every layer, against transformers.

    two copies of the model (float32, train mode): the unmodified one (eager attention), and one whose every
    self_attn is the implementation, its gradients through its own backward (user code in its worker: the
    forward and, on the way back, the gradients w.r.t. x and the four weights come from the worker)
    -> step 0: the language-model loss on the prompts (left-padded batch, padding ignored), then every
       parameter's gradient, compared
    -> N optimizer steps (AdamW, fixed learning rate, the same batch): every step's loss compared
    -> a TrainResult: passed only within the tolerances (llm.c's test_gpt2 pattern, failing loudly); report.py
       prints and writes it

Tolerances (measured on SmolLM2-135M, float32: transformers' sdpa path against its eager path, the float32 noise of
the same computation ordered differently): loss within LOSS_RTOL of the reference's, each parameter's gradient
within GRAD_RTOL of that gradient's largest magnitude. docs/grad.md has the measured noise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from harness.checkpoints.format import WEIGHT_NAMES
from harness.e2e.prompts import batch
from harness.verify.contracts.layer import forward as layer_forward
from harness.verify.contracts.layer_grad import layer_grad
from harness.verify.plugins import Impl

LOSS_RTOL = 1e-5  # of the loss
GRAD_RTOL = 1e-3  # of each parameter gradient's own scale (max |reference gradient|)
LR = 1e-4
STEPS = 10


class _Through(torch.autograd.Function):
    """One layer's attention through the implementation: the forward from impl.layer, the backward from
    impl.layer_grad (which recomputes the forward where the code runs, then its own autograd)."""

    @staticmethod
    def forward(ctx, x, wq, wk, wv, wo, impl, key, config, pos, mask):
        w = dict(zip(WEIGHT_NAMES, (wq, wk, wv, wo), strict=True))
        w = {k: v.detach() for k, v in w.items()}
        ctx.save_for_backward(x, wq, wk, wv, wo)
        ctx.impl, ctx.key, ctx.config, ctx.pos, ctx.mask = impl, key, config, pos, mask
        return layer_forward(impl, key, config, w, x.detach(), pos, mask)

    @staticmethod
    def backward(ctx, gout):
        x, *ws = ctx.saved_tensors
        w = {k: v.detach() for k, v in zip(WEIGHT_NAMES, ws, strict=True)}
        grads = layer_grad(ctx.impl, ctx.key, ctx.config, w, x.detach(), ctx.pos, ctx.mask, gout.contiguous())
        return (grads["x"], *(grads.get(n) for n in WEIGHT_NAMES), None, None, None, None, None)


class Trained(nn.Module):
    """Stands in for one layer's self_attn and keeps its parameters (the optimizer updates them)."""

    def __init__(self, hf_attn: nn.Module, layer: int, impl: Impl, config: dict, run: dict):
        super().__init__()
        for n in WEIGHT_NAMES:
            setattr(self, n, getattr(hf_attn, n))  # the same nn.Linear modules: the same Parameters
        self.layer, self.impl, self.config, self.run = layer, impl, config, run

    def forward(self, hidden_states, position_ids=None, **_):
        key = f"train:layer{self.layer}"
        self.impl.forget(key)  # the weights change every step: send them again
        ws = [getattr(self, n).weight for n in WEIGHT_NAMES]
        out = _Through.apply(hidden_states, *ws, self.impl, key, self.config, position_ids, self.run["mask"])
        return out, None


@dataclass
class TrainResult:
    loss_ref: list[float]  # per step
    loss_impl: list[float]
    loss_tol: float
    worst_grad: tuple[str, float]  # (parameter, max |diff| / max |reference gradient|) at step 0
    grad_tol: float
    passed: bool


def lm_batch(model, prompts: list[str]):
    """The prompts as one left-padded batch with language-model labels: ids, mask, positions, labels (B, S)."""
    ids, mask, pos = batch(model.tokenizer, prompts)
    # a token is scored when it and the token before it are real: the first real token of a left-padded row is
    # predicted from a padding position, whose output no model defines
    prev = torch.cat((torch.zeros_like(mask[:, :1]), mask[:, :-1]), dim=1)
    labels = ids.masked_fill((mask == 0) | (prev == 0), -100)
    return ids, mask, pos, labels


def run_train(model, impl: Impl, prompts: list[str], steps: int = STEPS, lr: float = LR, log=print) -> TrainResult:
    ids, mask, pos, labels = (t.to(model.lm.device) for t in lm_batch(model, prompts))
    ref = model.lm
    mine = copy.deepcopy(ref)
    run = {"mask": None if bool(mask.all()) else mask}
    for i, layer in enumerate(mine.model.layers):
        layer.self_attn = Trained(layer.self_attn, i, impl, model.config, run)
    ref.train()
    mine.train()
    torch.manual_seed(0)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr)
    opt_mine = torch.optim.AdamW(mine.parameters(), lr=lr)
    loss_ref, loss_mine, worst = [], [], ("", 0.0)
    try:
        for step in range(steps + 1):
            for m, opt, losses in ((ref, opt_ref, loss_ref), (mine, opt_mine, loss_mine)):
                opt.zero_grad(set_to_none=True)
                loss = m(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False).loss
                loss.backward()
                losses.append(float(loss.detach()))
            if step == 0:  # every parameter's gradient, before any update
                for (name, p_ref), (_, p_mine) in zip(ref.named_parameters(), mine.named_parameters(), strict=True):
                    if p_ref.grad is None:
                        continue
                    scale = float(p_ref.grad.abs().max()) or 1e-30
                    got = p_mine.grad if p_mine.grad is not None else torch.zeros_like(p_ref.grad)
                    r = float((got - p_ref.grad).abs().max()) / scale
                    if not r <= worst[1]:  # NaN included
                        worst = (name, r)
            log(f"  step {step:2d}: loss {loss_ref[-1]:.6f} (transformers) {loss_mine[-1]:.6f} (implementation)")
            if step < steps:
                opt_ref.step()
                opt_mine.step()
    finally:
        ref.eval()
    tol = LOSS_RTOL * max(abs(x) for x in loss_ref)
    ok_loss = all(abs(a - b) <= tol for a, b in zip(loss_ref, loss_mine, strict=True))
    return TrainResult(loss_ref, loss_mine, tol, worst, GRAD_RTOL, ok_loss and worst[1] <= GRAD_RTOL)
