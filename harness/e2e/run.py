"""`python -m harness e2e`: a whole real model with every layer's attention replaced by ours, against transformers.

    model in (float32, eager) -> prompts through the chat template, left-padded into one batch
    -> reference: the unmodified model's prefill logits, HF generate (greedy, its DynamicCache), HF's sdpa path
    -> swapped: every layer's self_attn replaced by the implementation (plug-in contract, that layer's weights)
         1. prefill logits vs the reference: max |diff| and argmax agreement at every real position
         2. greedy generation of N tokens: the token ids must be identical
         3. built-ins only: the same generation decoded token by token with impl.decode's KV cache
    -> report: a table per prompt, the texts where tokens differ, exit 0 / 1 (2: bad input)

(2) is decided in one teacher-forced pass: the swapped model reads the prompt followed by HF's N tokens, and its
argmax at each step must be HF's token. For a causal model that is exactly "greedy generation gives identical
tokens" (by induction over the steps) without N forward passes over the whole sequence, which is what the plug-in
contract (no cache) would otherwise cost. Causality is checked, not assumed: the prompt's logits must not move
when tokens follow it; if they do, or where a token differs, the swapped model generates for real (so the report
shows what it says instead). (3) is real token-by-token decoding.
Generation ignores end-of-turn tokens, so every prompt compares exactly N tokens. The prompts run as one batch,
left-padded as batched serving does (float32 decoding here is bound by reading the weights, so a batch of 3 costs
about what one prompt does); the padding mask and position ids are therefore part of the check.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness.common import Parser, UserError, resolve_device, write_json
from harness.e2e.swap import swapped

# 1e-3 of the logit scale (max |logit| of the reference at that prompt). Measured on SmolLM2-135M (30 layers),
# float32: the built-ins differ from HF eager by at most about 1e-5 of the scale, and HF's own sdpa path by about
# the same; the broken implementations of tests/plugins move the logits by 1e-1 of the scale or more.
LOGIT_RTOL = 1e-3

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain in a few sentences why the sky is blue.",
    "Summarize the following text in one sentence.\n\n"
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is named after the engineer "
    "Gustave Eiffel, whose company built it from 1887 to 1889 as the centrepiece of the 1889 World's Fair. At first "
    "criticised by some of France's leading artists, it has become a global icon of France. It is 330 metres tall.",
)


# ---------------------------------------------------------------------------------------------------------
# inputs and generation: all prompts in one left-padded batch, as batched serving runs them


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """The chat template when the tokenizer has one (instruct models), else the raw text with BOS: (S,)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"][0]
    return tokenizer(prompt, return_tensors="pt")["input_ids"][0]


def left_pad(rows: list[torch.Tensor], pad: int):
    """-> ids (B, S), mask (B, S) 1 = token, 0 = padding, positions (B, S) counting real tokens only."""
    B, S = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, S), pad)  # (B, S)
    mask = torch.zeros(B, S, dtype=torch.long)  # (B, S)
    for b, r in enumerate(rows):
        ids[b, S - len(r) :], mask[b, S - len(r) :] = r, 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def reference_logits(lm, ids, mask, pos) -> torch.Tensor:
    """The unmodified model's prefill logits (B, S, V), with the padding mask."""
    return lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


@torch.inference_mode()
def prefill(lm, run: swapped, ids, mask, pos) -> torch.Tensor:
    """The swapped model's logits (B, S, V) for the prompts alone; its modules keep the state for what follows."""
    run.mask = None if mask.all() else mask
    return lm(input_ids=ids, position_ids=pos, use_cache=False).logits


@torch.inference_mode()
def greedy(lm, run: swapped, ids, mask, pos, n: int):
    """Prefill, then n greedy tokens one step at a time; the swapped modules hold the state (inputs or KV cache).

    Returns (prefill logits (B, S, V), tokens (B, n), step logits (B, n, V)): step t's logits chose token t.
    """
    B = ids.shape[0]
    logits = prefill(lm, run, ids, mask, pos)  # (B, S, V)
    steps, tokens, nxt = [logits[:, -1]], [], pos[:, -1:]  # (B, V), [], (B, 1)
    for t in range(n):
        tokens.append(steps[-1].argmax(-1))  # (B,)
        if t == n - 1:
            break
        mask, nxt = torch.cat((mask, mask.new_ones(B, 1)), dim=1), nxt + 1  # (B, T + 1), (B, 1)
        run.mask = None if mask.all() else mask
        steps.append(lm(input_ids=tokens[-1][:, None], position_ids=nxt, use_cache=False).logits[:, -1])
    return logits, torch.stack(tokens, 1), torch.stack(steps, 1)  # (B, S, V), (B, n), (B, n, V)


@torch.inference_mode()
def teacher_forced(lm, run: swapped, ids, mask, pos, ref_tokens):
    """One forward over prompt + HF's generated tokens: row S-1+t holds the logits the model produces for step t
    given HF's first t tokens. For a causal model, greedy generation reproduces HF's tokens exactly when every
    step's argmax equals HF's token (by induction over the steps), so this decides "tokens identical" in one pass.

    Returns (prefill logits (B, S, V), step argmaxes (B, n), step logits (B, n, V)).
    """
    B, S = ids.shape
    n = ref_tokens.shape[1]
    full = torch.cat((ids, ref_tokens[:, :-1]), dim=1)  # (B, S + n - 1)
    fmask = torch.cat((mask, mask.new_ones(B, n - 1)), dim=1)  # (B, S + n - 1)
    fpos = torch.cat((pos, pos[:, -1:] + torch.arange(1, n)), dim=1)  # (B, S + n - 1)
    run.mask = None if fmask.all() else fmask
    logits = lm(input_ids=full, position_ids=fpos, use_cache=False).logits  # (B, S + n - 1, V)
    steps = logits[:, S - 1 :]  # (B, n, V)
    return logits[:, :S], steps.argmax(-1), steps


@torch.inference_mode()
def hf_generate(lm, ids, mask, n: int):
    """transformers' own greedy generate with its KV cache; end-of-turn ignored. -> tokens (B, n), logits (B, n, V)."""
    out = lm.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        top_p=None,
        top_k=None,
        temperature=None,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def step_err(a: torch.Tensor, b: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor) -> float:
    """max |diff| of one prompt's step logits (n, V) while both runs fed the same tokens (after a divergence the
    inputs differ and so may the logits)."""
    differ = (ta != tb).nonzero()
    k = int(differ[0, 0]) + 1 if len(differ) else len(ta)  # the step that chose the first differing token counts
    return max_err(a[:k], b[:k])


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max()) if torch.isfinite(got).all() else float("inf")


# ---------------------------------------------------------------------------------------------------------
# the check


@dataclass
class PromptResult:
    prompt: str
    n_prompt_tokens: int
    tokens_equal: bool
    max_logit_abs_err: float  # prefill, every real position
    tolerance: float  # LOGIT_RTOL x max |reference logit| of this prompt
    argmax_agreement: float  # fraction of prompt positions whose argmax matches
    hf_sdpa_max_logit_abs_err: float  # transformers' own sdpa path vs its eager path: float32's noise
    generate_max_logit_abs_err: float  # over the generation steps, up to the first differing token
    decode_tokens_equal: bool | None  # None for plug-ins (the contract has no KV cache)
    decode_max_logit_abs_err: float | None  # over the KV-cache steps, while the tokens agree
    passed: bool
    text_ref: str
    text_impl: str
    text_decode: str | None = None


def run_e2e(model, fn, core, prompts: list[str], n: int) -> list[PromptResult]:
    """Every prompt through the reference and through the swapped model (and, for built-ins, the KV cache)."""
    lm, tok = model.lm, model.tokenizer
    rows = [encode_prompt(tok, p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask, pos = (t.to(lm.device) for t in left_pad(rows, pad))  # (B, S) x3, where the model is

    # reference: the unmodified model (eager), its generate, and its sdpa path for the noise floor
    ref = reference_logits(lm, ids, mask, pos)  # (B, S, V)
    ref_tokens, ref_steps = hf_generate(lm, ids, mask, n)  # (B, n), (B, n, V)
    lm.set_attn_implementation("sdpa")
    try:
        ref_sdpa = reference_logits(lm, ids, mask, pos)
    finally:
        lm.set_attn_implementation("eager")

    # 1: prefill logits, the prompts alone; 2: every generation step in one teacher-forced pass
    with swapped(model, fn, "contract") as run:
        logits = prefill(lm, run, ids, mask, pos)  # (B, S, V)
    with swapped(model, fn, "contract") as run:
        forced, tokens, steps = teacher_forced(lm, run, ids, mask, pos, ref_tokens)  # (B, S, V), (B, n), (B, n, V)
    # Teacher forcing decides only for a causal model: the prompt's logits must not move when tokens follow it.
    # If they do (a mask bug), generate for real instead.
    real = mask.bool()  # padded positions' outputs are never used
    causal = all(
        max_err(forced[b, real[b]], logits[b, real[b]]) <= LOGIT_RTOL * float(ref[b, real[b]].abs().max())
        for b in range(len(prompts))
    )
    differ = [b for b in range(len(prompts)) if not torch.equal(tokens[b], ref_tokens[b])]
    texts = {}
    if not causal or differ:  # generate for real: the verdict, and what the implementation says instead
        sub = torch.arange(len(prompts)) if not causal else torch.tensor(differ)
        with swapped(model, fn, "contract") as run:
            _, gen, gen_steps = greedy(lm, run, ids[sub], mask[sub], pos[sub], n)
        if not causal:
            tokens, steps = gen, gen_steps
            differ = [b for b in range(len(prompts)) if not torch.equal(tokens[b], ref_tokens[b])]
        texts = {int(b): tok.decode(g) for b, g in zip(sub, gen, strict=True)}
    # 3: built-ins, decoding token by token with the project's KV cache
    if core is not None:
        with swapped(model, core, "kv") as run:
            _, dec_tokens, dec_steps = greedy(lm, run, ids, mask, pos, n)

    results = []
    for b, prompt in enumerate(prompts):
        r, got = ref[b, real[b]], logits[b, real[b]]  # (S_b, V)
        tol = LOGIT_RTOL * float(r.abs().max())
        err, gen_err = max_err(got, r), step_err(steps[b], ref_steps[b], tokens[b], ref_tokens[b])
        same = b not in differ
        passed = same and err <= tol and gen_err <= tol
        dec_same = dec_err = dec_text = None
        if core is not None:
            dec_same = bool(torch.equal(dec_tokens[b], ref_tokens[b]))
            dec_err = step_err(dec_steps[b], ref_steps[b], dec_tokens[b], ref_tokens[b])
            dec_text = tok.decode(dec_tokens[b])
            passed = passed and dec_same and dec_err <= tol
        results.append(
            PromptResult(
                prompt=prompt,
                n_prompt_tokens=int(real[b].sum()),
                tokens_equal=same,
                max_logit_abs_err=err,
                tolerance=tol,
                argmax_agreement=float((got.argmax(-1) == r.argmax(-1)).float().mean()),
                hf_sdpa_max_logit_abs_err=max_err(ref_sdpa[b, real[b]], r),
                generate_max_logit_abs_err=gen_err,
                decode_tokens_equal=dec_same,
                decode_max_logit_abs_err=dec_err,
                passed=bool(passed),
                text_ref=tok.decode(ref_tokens[b]),
                text_impl=texts.get(b, tok.decode(ref_tokens[b])),
                text_decode=dec_text,
            )
        )
    return results


# ---------------------------------------------------------------------------------------------------------
# command line


def read_prompts(path: str | None) -> list[str]:
    """--prompts FILE: a JSON list of strings, or plain text with one prompt per line (blank lines skipped)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file; give a text file with one prompt per line, or a JSON list")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts {path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        if not isinstance(prompts, list) or not all(isinstance(s, str) for s in prompts):
            raise UserError(f"--prompts {path}: expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [s for s in prompts if s.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it; write one prompt per line")
    return prompts


def short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def report(model, impl: str, results: list[PromptResult], n: int, log=print) -> None:
    c = model.config
    log(
        f"\n{model.name}: {c['num_hidden_layers']} layers, {c['num_attention_heads']} query / "
        f"{c['num_key_value_heads']} kv heads, head_dim {c['head_dim']}; float32; impl {impl}; {n} greedy tokens"
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


def main(argv=None) -> int:
    from harness.checkpoints.validate import output_path
    from harness.e2e.model import DEFAULT_MODEL, load_model
    from harness.verify.plugins import LAYOUTS, resolve
    from impl import CORES

    p = Parser(
        prog="attention-verify e2e",
        description="Swap an attention implementation into every layer of a real model; compare logits and "
        "greedy tokens with transformers.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default), hf:OWNER/NAME[@REV], or a directory")
    p.add_argument("--impl", help="a layer: a built-in (naive, loop, tiled, sdpa) or module:function (default tiled)")
    p.add_argument("--module", help="a module factory module:build, build(config, weights) -> layer")
    p.add_argument("--weights-layout", choices=LAYOUTS, default="hf", help="q/k row order: hf (default) or meta")
    p.add_argument("--prompts", help="a text file with one prompt per line, or a JSON list of strings")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens to generate per prompt (default 32)")
    p.add_argument("--train", action="store_true", help="training instead: one forward and backward (loss and every "
                   "parameter's gradient), then optimizer steps, against transformers")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="AdamW steps with --train (default 10)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="for the whole model run (default 1800): past it, stage timeout")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--json", type=Path, help="write the result as JSON to this path")
    a = p.parse_args(argv)
    if a.tokens < 1:
        raise UserError(f"--tokens {a.tokens}: must be at least 1")
    if a.steps < 0:
        raise UserError(f"--steps {a.steps}: must be 0 or more")
    if not a.timeout > 0:
        raise UserError(f"--timeout {a.timeout:g}: give a positive number of seconds")
    if a.json:
        output_path(a.json, "--json")
    if a.impl and a.module:
        raise UserError("give --impl or --module, not both")
    prompts = read_prompts(a.prompts)
    spec, contract = (a.module, "module") if a.module else (a.impl or "tiled", "layer")
    device = resolve_device(a.device)
    impl = resolve(spec, contract, layout=a.weights_layout, device=str(device))

    t0 = time.perf_counter()
    impl.prepare(a.timeout)
    model = load_model(a.model)
    model.lm.to(device)
    print(f"loaded {model.name} ({model.source}) in {model.seconds:.1f} s, on {device}")
    core = CORES.get(spec) if impl.builtin else None  # built-ins also decode with impl.decode's KV cache
    impl.deadline = time.monotonic() + a.timeout
    if a.train:
        return train_main(a, model, impl, spec, contract, prompts, t0)
    results, fault = _guarded(impl, spec, lambda: run_e2e(model, impl, core, prompts, a.tokens))
    results = results or []
    seconds = time.perf_counter() - t0
    if fault is None:
        report(model, spec, results, a.tokens)
    passed = fault is None and all(r.passed for r in results)
    ok = sum(r.passed for r in results)
    print(f"\n{'PASS' if passed else 'FAIL'}: {ok}/{len(prompts)} prompts, {spec} on {model.name}, {seconds:.1f} s")
    if a.json:
        write_json(a.json, {
            "model": a.model, "impl": spec, "contract": contract, "passed": passed,
            "stage": fault.stage if fault else None, "error": (fault.traceback or fault.message) if fault else None,
            "tokens": a.tokens, "logit_rtol": LOGIT_RTOL, "prompts": [asdict(r) for r in results],
            "seconds": round(seconds, 2),
        })  # fmt: skip
    return 0 if passed else 1


def _guarded(impl, spec: str, run):
    """(run(), None), or (None, the fault) printed as the verdict's line; the worker closed either way."""
    from harness.verify.worker import Fault

    try:
        return run(), None
    except Fault as e:
        print(f"FAIL: stage {e.stage}: {spec} {e.message}")
        return None, e
    finally:
        impl.close()


def train_main(a, model, impl, spec: str, contract: str, prompts: list[str], t0: float) -> int:
    """--train: the training check, its report and exit code."""
    from harness.e2e.train import run_train

    print(f"training {model.name} with {spec} in every layer: {len(prompts)} prompts, {a.steps} AdamW steps")
    result, fault = _guarded(impl, spec, lambda: run_train(model, impl, prompts, steps=a.steps))
    seconds = time.perf_counter() - t0
    if fault is not None:
        passed = False
    else:
        name, worst = result.worst_grad
        steps = [abs(x - y) for x, y in zip(result.loss_ref, result.loss_impl, strict=True)]
        print(f"  loss at step 0: {result.loss_ref[0]:.6f} vs {result.loss_impl[0]:.6f} (|diff| {steps[0]:.2e}); "
              f"largest |loss diff| over {len(steps)} steps {max(steps):.2e}, tolerance {result.loss_tol:.1e} "
              f"{'OK' if max(steps) <= result.loss_tol else 'NOT OK'}")
        print(f"  gradients at step 0: worst parameter {name}, max |diff| = {worst:.2e} of its scale, tolerance "
              f"{result.grad_tol:g} {'OK' if worst <= result.grad_tol else 'NOT OK'}")
        passed = result.passed
    print(f"\n{'PASS' if passed else 'FAIL'}: training {spec} on {model.name}, {seconds:.1f} s")
    if a.json:
        doc = {"model": a.model, "impl": spec, "contract": contract, "train": True, "passed": passed,
               "stage": fault.stage if fault else None, "error": (fault.traceback or fault.message) if fault else None,
               "seconds": round(seconds, 2)}  # fmt: skip
        if result is not None:
            doc |= {"loss_ref": result.loss_ref, "loss_impl": result.loss_impl, "loss_tol": result.loss_tol,
                    "worst_grad": {"parameter": result.worst_grad[0], "rel_err": result.worst_grad[1]},
                    "grad_rtol": result.grad_tol}  # fmt: skip
        write_json(a.json, doc)
    return 0 if passed else 1
