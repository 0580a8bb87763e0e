"""The e2e inference pipeline: a whole real model with every layer's attention replaced by ours, against
transformers.

    prompts through the chat template, left-padded into one batch (prompts.py)
    -> reference: the unmodified model's prefill logits, HF generate (greedy, its DynamicCache), HF's sdpa path
    -> swapped: every layer's self_attn replaced by the implementation (plug-in contract, that layer's weights)
         1. prefill logits vs the reference: max |diff| and argmax agreement at every real position
         2. greedy generation of N tokens: the token ids must be identical
         3. built-ins only: the same generation decoded token by token with impl.decode's KV cache
    -> one PromptResult per prompt (report.py prints and writes them)

(2) is decided in one teacher-forced pass: the swapped model reads the prompt followed by HF's N tokens, and its
argmax at each step must be HF's token. For a causal model that is exactly "greedy generation gives identical
tokens" (by induction over the steps) without N forward passes over the whole sequence, which is what the plug-in
contract (no cache) would otherwise cost. Causality is checked, not assumed: the prompt's logits must not move
when tokens follow it; if they do, or where a token differs, the swapped model generates for real (so the report
shows what it says instead). (3) is real token-by-token decoding.
Generation ignores end-of-turn tokens, so every prompt compares exactly N tokens. The prompts run as one batch,
left-padded as batched serving does (float32 decoding is bound by reading the weights, so a small batch costs
about what one prompt does); the padding mask and position ids are therefore part of the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.e2e.prompts import batch
from harness.e2e.swap import swapped

# Of the logit scale (max |logit| of the reference at that prompt). Far above float32's noise over a whole model
# (the built-ins, and HF's own sdpa path, against HF eager) and far below what the broken implementations of
# tests/plugins do to the logits; docs/e2e.md has the measured numbers.
LOGIT_RTOL = 1e-3


# ---------------------------------------------------------------------------------------------------------
# prefill and generation, through the unmodified model and through the swapped one


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
    ids, mask, pos = (t.to(lm.device) for t in batch(tok, prompts))  # (B, S) x3, where the model is

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
