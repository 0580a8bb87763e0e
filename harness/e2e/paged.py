"""`e2e --paged SPEC`: a whole real model served through the user's paged kernel (the --paged contract,
contracts/paged.py) in every attention layer, with the harness's own page allocator and cache writes (pages.py),
against transformers' `generate`.

    every layer's self_attn -> PagedAttention: the harness projects q, k, v with the layer's own weights (the
        family's biases and q/k norms, RoPE with the layer's parameters: impl/projection.py, as the other e2e paths),
        writes the new k and v into their slots of the layer's pool, calls the kernel for the attention (block_table
        and cache_seqlens of the forward's sequences; the layer's window, scale, softcap and sinks: impl/layer.py
        keywords), then o_proj
    prefill     one sequence at a time through the same kernel: Sq = its prompt length, an empty cache before
                (chunked prefill's semantics: the queries are the sequence's last Sq tokens); no padding anywhere
    decoding    every sequence in one batch, Sq = 1 each, their cache lengths differing: N - 1 steps after the
                prefill give N greedy tokens
    judged      at every step, each sequence's logits against transformers' (prefill: every prompt position against
                its forward; step t: against `generate`'s logits of step t), within infer.LOGIT_RTOL of the prompt's
                logit scale, and its token against generate's; a sequence is compared while its tokens so far are
                transformers' (after a differing token its inputs differ). The first step that fails is kept with
                every layer's attention output, for paged_verdict.py to name the first layer that differs.

User code runs where the other contracts run it (verify/plugins.py): a built-in here, anything else in its worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from harness.e2e.infer import LOGIT_RTOL, hf_generate, max_err, reference_logits
from harness.e2e.pages import PagePool
from harness.e2e.prompts import batch
from harness.e2e.swap import attn_params
from harness.reference.family import layer_config
from harness.verify.contracts import core
from harness.verify.contracts import paged as contract
from harness.verify.plugins import Builtin, Impl
from harness.verify.worker import Fault
from impl.layer import keywords
from impl.projection import output, project_qkv

OPTIONAL = ("window", "softcap", "sinks")  # the contract's optional keywords: passed only where the layer sets them


def call_kernel(impl: Impl, q, k_cache, v_cache, table, lens, kw: dict, where: str):
    """The paged kernel on one layer's inputs -> (out [B, H, Sq, d], lse or None), checked against the contract. A
    fault names where it happened; a built-in that raises is a crash, as verify has it."""
    extra, more = core.features(kw.get("window"), kw.get("softcap", 0.0), kw.get("sinks"))
    t = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": table, "cache_seqlens": lens} | more
    header = {"causal": True, "scale": kw.get("scale")} | extra
    try:
        descs, items = impl.call(contract, header, t, f"running the paged kernel at {where}",
                                 expect=q.numel() + q[..., 0].numel())  # out and lse  # fmt: skip
        return core.check_output(descs, items, q, impl.device)
    except Fault as e:
        raise Fault(e.stage, f"{where}: {e.message}", e.traceback) from None
    except Exception as e:  # noqa: BLE001 - a built-in (the catalog's bugs) raising: a crash, as verify has it
        if not impl.builtin:
            raise
        raise Fault("crash", f"{where}: raised {type(e).__name__}: {e}") from None


class PagedAttention(nn.Module):
    """One layer's self_attn: the harness's projections and cache writes around the kernel under test."""

    def __init__(self, hf_attn: nn.Module, layer: int, run: paged_swap):
        super().__init__()
        self.layer, self.run, self.config = layer, run, layer_config(run.config, layer)
        self.weights = {n: w.detach() for n, w in attn_params(hf_attn, self.config).items()}
        self.kw = keywords(self.config, self.weights)  # window, scale, softcap, sinks where the layer sets them

    def forward(self, hidden_states, position_ids=None, **_):
        run = self.run
        q, k, v = project_qkv(hidden_states, self.weights, self.config, position_ids)  # (b, H, S, d), (b, Hkv, S, d)
        run.pool.write(self.layer, k, v)
        k_cache, v_cache, table, lens = run.pool.inputs(self.layer)
        out, _ = call_kernel(run.impl, q, k_cache, v_cache, table, lens, self.kw, f"{run.where}, layer {self.layer}")
        o = output(out, self.weights)  # (b, S, D)
        for row, b in enumerate(run.pool.seqs):
            run.outputs.setdefault(self.layer, {})[b] = o[row]  # (S, D)
            run.kernel_out.setdefault(self.layer, {})[b] = out[row]  # (H, S, d)
        return o, None


class paged_swap:
    """Context manager: every layer's self_attn replaced by a PagedAttention over one PagePool; restored on exit."""

    def __init__(self, model, impl: Impl, pool: PagePool):
        missing = [kw for kw in OPTIONAL if not impl.accepts(kw)]
        needed = {kw for i in range(model.config["num_hidden_layers"])
                  for kw in keywords(layer_config(model.config, i), {}) if kw in missing}  # fmt: skip
        if needed:  # a layer needs a keyword the kernel lacks: it cannot run this model at all
            raise Fault("contract", f"{model.name}'s layers need the keyword(s) {', '.join(sorted(needed))}, which "
                        "the kernel's signature lacks")  # fmt: skip
        self.model, self.impl, self.pool, self.config = model, impl, pool, model.config
        self.where = "prefill"  # what the kernel is running for, in faults
        self.outputs: dict[int, dict[int, torch.Tensor]] = {}  # layer -> sequence -> its attention output (S, D)
        self.kernel_out: dict[int, dict[int, torch.Tensor]] = {}  # layer -> sequence -> the kernel's out (H, S, d)

    def __enter__(self):
        self.orig = [layer.self_attn for layer in self.model.layers]
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = PagedAttention(self.orig[i], i, self)
        return self

    def __exit__(self, *exc):
        for layer, attn in zip(self.model.layers, self.orig, strict=True):
            layer.self_attn = attn
        return False


# ---------------------------------------------------------------------------------------------------------
# the steps, judged as they are taken


@dataclass
class Judge:
    """Each step's logits and tokens against transformers'; the first failing step's evidence."""

    ref_prefill: list[torch.Tensor]  # per sequence (S_b, V): the reference forward at every prompt position
    ref_tokens: torch.Tensor  # (B, n): generate's tokens
    ref_steps: torch.Tensor  # (B, n, V): generate's logits, step t chose token t
    tol: list[float]  # per sequence: LOGIT_RTOL x its max |reference logit|
    prefill_err: list[float] = field(default_factory=list)
    step_err: list[float] = field(default_factory=list)  # per sequence, over the decode steps it was compared at
    differ: list[int | None] = field(default_factory=list)  # per sequence: the step whose token differs first
    first: list[int | None] = field(default_factory=list)  # per sequence: the first step it failed
    bad: int | None = None  # the first failing step (0: prefill)
    bad_seqs: list[int] = field(default_factory=list)  # the sequences that failed it
    logit_fail: bool = False  # that step failed on its logits (not only on a near-tie token)
    evidence: dict = field(default_factory=dict)  # that step's attention outputs, kernel outputs, cache lengths
    last: dict = field(default_factory=dict)  # the same of the last step judged (a passing run's layer noise)

    def __post_init__(self):
        B = len(self.tol)
        self.step_err, self.differ, self.first = [0.0] * B, [None] * B, [None] * B

    def judge(self, t: int, logits: list[torch.Tensor], run: paged_swap) -> None:
        """Step t's logits, one (rows, V) per sequence (prefill: every prompt position; a step: its one row)."""
        failed, by_logits = [], False
        for b, got in enumerate(logits):
            if self.differ[b] is not None:  # its inputs are no longer transformers'
                continue
            if t == 0:
                err = max(max_err(got, self.ref_prefill[b]), max_err(got[-1:], self.ref_steps[b, :1]))
                self.prefill_err.append(err)
            else:
                err = max_err(got, self.ref_steps[b, t : t + 1])
                self.step_err[b] = max(self.step_err[b], err)
            token_differs = int(got[-1].argmax()) != int(self.ref_tokens[b, t])
            if token_differs:
                self.differ[b] = t
            if err > self.tol[b] or token_differs:
                failed.append(b)
                by_logits |= err > self.tol[b]
                self.first[b] = t if self.first[b] is None else self.first[b]
        self.last = {"step": t, "outputs": run.outputs, "kernel_out": run.kernel_out, "lens": run.pool.lens.tolist()}
        if failed and self.bad is None:
            self.bad, self.bad_seqs, self.logit_fail, self.evidence = t, failed, by_logits, self.last


@torch.inference_mode()
def generate(lm, run: paged_swap, rows: list[torch.Tensor], n: int, judge: Judge) -> torch.Tensor:
    """Prefill each sequence, then n - 1 decode steps of the whole batch, judged after each step -> tokens (B, n)."""
    B, dev = len(rows), lm.device
    run.outputs, run.kernel_out, last = {}, {}, []
    for b, r in enumerate(rows):  # prefill: one sequence per forward, so Sq is its prompt length
        run.where = f"prefill (sequence {b}, {len(r)} tokens)"
        run.pool.begin([b], len(r))
        pos = torch.arange(len(r), device=dev)[None]  # (1, S_b)
        last.append(lm(input_ids=r[None].to(dev), position_ids=pos, use_cache=False).logits[0])  # (S_b, V)
    judge.judge(0, last, run)
    tokens = [torch.stack([x[-1].argmax() for x in last])]  # [(B,)]
    for t in range(1, n):
        run.where, run.outputs, run.kernel_out = f"decode step {t}", {}, {}
        pos = run.pool.lens.to(dev)[:, None].long()  # (B, 1): each sequence's next position
        run.pool.begin(list(range(B)), 1)
        logits = lm(input_ids=tokens[-1][:, None], position_ids=pos, use_cache=False).logits[:, -1]  # (B, V)
        judge.judge(t, list(logits[:, None]), run)
        tokens.append(logits.argmax(-1))
    return torch.stack(tokens, 1)  # (B, n)


# ---------------------------------------------------------------------------------------------------------
# the check


@dataclass
class PagedPrompt:
    prompt: str
    n_prompt_tokens: int
    tokens_equal: bool
    prefill_max_logit_abs_err: float  # every prompt position, against transformers' forward
    steps_max_logit_abs_err: float  # the decode steps, while its tokens were transformers'
    tolerance: float  # LOGIT_RTOL x max |reference logit| of this prompt
    first_bad_step: int | None  # 0: prefill; t: decode step t; None: none
    passed: bool
    text_ref: str
    text_impl: str


@dataclass
class PagedResult:
    prompts: list[PagedPrompt]
    page_size: int
    num_blocks: int
    decode_steps: int
    judge: Judge
    rows: list[torch.Tensor]  # each prompt's token ids (S_b,)
    tokens: torch.Tensor  # (B, n): the paged run's greedy tokens

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.prompts)


def as_impl(kernel) -> Impl:
    """An Impl as given, or a paged kernel function run here (tests, the bug catalog)."""
    return kernel if isinstance(kernel, Impl) else Builtin(getattr(kernel, "__name__", "kernel"), "paged", kernel)


def run_paged_e2e(model, kernel, prompts: list[str], n: int, page_size: int = 16, seed: int = 0) -> PagedResult:
    """Every prompt through transformers (forward and generate) and through the model served by the paged kernel."""
    impl, lm, tok = as_impl(kernel), model.lm, model.tokenizer
    ids, mask, pos = (t.to(lm.device) for t in batch(tok, prompts))  # (B, S) x3, left-padded for transformers
    ref = reference_logits(lm, ids, mask, pos)  # (B, S, V)
    ref_tokens, ref_steps = hf_generate(lm, ids, mask, n)  # (B, n), (B, n, V)
    real = mask.bool()
    rows = [ids[b, real[b]] for b in range(len(prompts))]  # each prompt's own tokens, no padding: (S_b,)
    ref_prefill = [ref[b, real[b]] for b in range(len(prompts))]  # (S_b, V)
    judge = Judge(ref_prefill, ref_tokens, ref_steps, [LOGIT_RTOL * float(r.abs().max()) for r in ref_prefill])
    pool = PagePool([len(r) + n for r in rows], page_size, seed)
    with paged_swap(model, impl, pool) as run:
        tokens = generate(lm, run, rows, n, judge)
    out = []
    for b, prompt in enumerate(prompts):
        same = bool(torch.equal(tokens[b], ref_tokens[b]))
        ok = same and judge.prefill_err[b] <= judge.tol[b] and judge.step_err[b] <= judge.tol[b]
        out.append(PagedPrompt(prompt, len(rows[b]), same, judge.prefill_err[b], judge.step_err[b], judge.tol[b],
                               judge.first[b], ok, tok.decode(ref_tokens[b]), tok.decode(tokens[b])))  # fmt: skip
    return PagedResult(out, page_size, pool.num_blocks, n - 1, judge, rows, tokens)
