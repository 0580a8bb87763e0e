"""What an e2e run prints and writes: the per-prompt table (inference, --paged), the loss and gradient lines
(--train), and the JSON documents of every mode, each carrying the device the run used."""

from __future__ import annotations

from dataclasses import asdict

from harness.e2e.infer import LOGIT_RTOL, PromptResult
from harness.e2e.model import sliding_layers
from harness.e2e.paged import PagedResult
from harness.e2e.paged_verdict import LAYER_RTOL, Verdict
from harness.e2e.train import NOISE_FACTOR, TrainResult
from harness.reference.family import head_dim


def short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def report(model, impl: str, results: list[PromptResult], n: int, log=print) -> None:
    """The inference table: one line per prompt, then the texts wherever the tokens differ."""
    c = model.config
    L, sliding = c["num_hidden_layers"], len(sliding_layers(c))
    layers = f"{L} layers" + (f" ({sliding} sliding, window {c['sliding_window']}; {L - sliding} full)"
                              if sliding else "")  # fmt: skip
    log(
        f"\n{model.name}: {layers}, {c['num_attention_heads']} query / "
        f"{c['num_key_value_heads']} kv heads, head_dim {head_dim(c)}; float32; impl {impl}; {n} greedy tokens"
    )
    log(f"  {'prompt':32s} {'tokens':>6s} {'prefill |diff|':>14s} {'steps |diff|':>12s} {'HF sdpa':>8s} "
        f"{'tolerance':>9s} {'argmax':>7s} {'gen tokens':>10s} {'KV decode':>10s}  verdict")  # fmt: skip
    for r in results:
        dec = "n/a" if r.decode_tokens_equal is None else ("identical" if r.decode_tokens_equal else "DIFFER")
        steps = max(r.generate_max_logit_abs_err, r.decode_max_logit_abs_err or 0.0)
        log(
            f"  {short(r.prompt, 32):32s} {r.n_prompt_tokens:6d} {r.max_logit_abs_err:14.2e} {steps:12.2e} "
            f"{r.hf_sdpa_max_logit_abs_err:8.1e} {r.tolerance:9.1e} {100 * r.argmax_agreement:6.1f}% "
            f"{'identical' if r.tokens_equal else 'DIFFER':>10s} {dec:>10s}  {'OK' if r.passed else 'NOT OK'}"
        )
    log(
        "  max |logit diff| vs HF eager: prefill at every prompt position; steps: the generation steps (and KV "
        f"decoding); HF sdpa: HF's own sdpa vs eager, float32 noise; tolerance: {LOGIT_RTOL:g} x max |logit|"
    )
    for r in results:
        if not r.tokens_equal or r.decode_tokens_equal is False:
            log(f"\n  tokens differ for: {short(r.prompt, 60)}")
            log(f"    HF generate : {r.text_ref!r}")
            if not r.tokens_equal:
                log(f"    swapped     : {r.text_impl!r}")
            if r.decode_tokens_equal is False:
                log(f"    KV decode   : {r.text_decode!r}")


def paged_report(model, spec: str, result: PagedResult, v: Verdict, log=print) -> None:
    """--paged: one line per prompt, the verdict (the first step and layer that differ), the texts where tokens
    differ."""
    n = result.decode_steps + 1
    log(f"\n{model.name}: {model.config['num_hidden_layers']} layers; float32; paged kernel {spec} in every layer; "
        f"page size {result.page_size}, {result.num_blocks} blocks per layer; prefill and {result.decode_steps} decode "
        f"steps ({n} greedy tokens)")  # fmt: skip
    log(f"  {'prompt':32s} {'tokens':>6s} {'prefill |diff|':>14s} {'steps |diff|':>12s} {'tolerance':>9s} "
        f"{'gen tokens':>10s} {'first bad':>9s}  verdict")  # fmt: skip
    for p in result.prompts:
        bad = "-" if p.first_bad_step is None else ("prefill" if p.first_bad_step == 0 else f"step {p.first_bad_step}")
        log(f"  {short(p.prompt, 32):32s} {p.n_prompt_tokens:6d} {p.prefill_max_logit_abs_err:14.2e} "
            f"{p.steps_max_logit_abs_err:12.2e} {p.tolerance:9.1e} {'identical' if p.tokens_equal else 'DIFFER':>10s} "
            f"{bad:>9s}  {'OK' if p.passed else 'NOT OK'}")  # fmt: skip
    log(f"  max |logit diff| vs transformers: prefill at every prompt position (its forward); steps: each decode step "
        f"against generate's logits, while the tokens agree; tolerance: {LOGIT_RTOL:g} x max |logit|")  # fmt: skip
    log(f"\n  {v.text}")
    for p in result.prompts:
        if not p.tokens_equal:
            log(f"\n  tokens differ for: {short(p.prompt, 60)}")
            log(f"    HF generate : {p.text_ref!r}")
            log(f"    paged       : {p.text_impl!r}")


def paged_json(model: str, spec: str, device: str, passed: bool, fault, tokens: int, result: PagedResult | None,
               v: Verdict | None, seconds: float) -> dict:  # fmt: skip
    """The --paged result: the verdict (first step, layer, per-layer errors there) and every prompt's row."""
    doc = {"model": model, "impl": spec, "contract": "paged", "device": device, "passed": passed, **_fault(fault),
           "tokens": tokens, "logit_rtol": LOGIT_RTOL, "layer_rtol": LAYER_RTOL,
           "seconds": round(seconds, 2)}  # fmt: skip
    if result is not None and v is not None:
        doc |= {"page_size": result.page_size, "num_blocks": result.num_blocks, "decode_steps": result.decode_steps,
                "verdict": v.text, "first_step": v.step, "first_layer": v.layer, "diagnosis_stage": v.stage,
                "layer_rel_errs": v.layer_rel_errs,
                "prompts": [asdict(p) | {"device": device} for p in result.prompts]}  # fmt: skip
    return doc


def train_report(result: TrainResult, log=print) -> None:
    """--train: the loss over the steps and the worst parameter gradient at step 0, each against its tolerance."""
    name, worst = result.worst_grad
    steps = [abs(x - y) for x, y in zip(result.loss_ref, result.loss_impl, strict=True)]
    tol = result.steps_tol or result.loss_tol
    ok = steps[0] <= result.loss_tol and max(steps) <= tol
    log(f"  loss at step 0: {result.loss_ref[0]:.6f} vs {result.loss_impl[0]:.6f} (|diff| {steps[0]:.2e}, tolerance "
        f"{result.loss_tol:.1e}); largest |loss diff| over {len(steps)} steps {max(steps):.2e}, tolerance {tol:.1e} "
        f"{'OK' if ok else 'NOT OK'}")  # fmt: skip
    if result.loss_sdpa is not None:
        noise = max(abs(x - y) for x, y in zip(result.loss_ref, result.loss_sdpa, strict=True))
        log(f"  the steps' tolerance: {NOISE_FACTOR} x {noise:.2e}, the largest gap between transformers' own sdpa "
            f"and eager paths over the same steps (float32 noise, amplified by AdamW)")  # fmt: skip
    log(f"  gradients at step 0: worst parameter {name}, max |diff| = {worst:.2e} of its scale, tolerance "
        f"{result.grad_tol:g} {'OK' if worst <= result.grad_tol else 'NOT OK'}")  # fmt: skip


def _fault(fault) -> dict:
    return {"stage": fault.stage if fault else None, "error": (fault.traceback or fault.message) if fault else None}


def infer_json(model: str, impl: str, contract: str, device: str, passed: bool, fault, tokens: int,
               results: list[PromptResult], seconds: float) -> dict:  # fmt: skip
    """The inference result; every prompt row carries the device too, so a row reads on its own."""
    return {
        "model": model, "impl": impl, "contract": contract, "device": device, "passed": passed, **_fault(fault),
        "tokens": tokens, "logit_rtol": LOGIT_RTOL, "prompts": [asdict(r) | {"device": device} for r in results],
        "seconds": round(seconds, 2),
    }  # fmt: skip


def train_json(model: str, impl: str, contract: str, device: str, passed: bool, fault, result: TrainResult | None,
               seconds: float) -> dict:  # fmt: skip
    """The --train result: the losses of every step and the worst gradient, when the run got that far."""
    doc = {"model": model, "impl": impl, "contract": contract, "device": device, "train": True, "passed": passed,
           **_fault(fault), "seconds": round(seconds, 2)}  # fmt: skip
    if result is not None:
        doc |= {"loss_ref": result.loss_ref, "loss_impl": result.loss_impl, "loss_tol": result.loss_tol,
                "worst_grad": {"parameter": result.worst_grad[0], "rel_err": result.worst_grad[1]},
                "grad_rtol": result.grad_tol, "loss_sdpa": result.loss_sdpa, "steps_tol": result.steps_tol}  # fmt: skip
    return doc
