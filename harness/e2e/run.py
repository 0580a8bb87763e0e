"""`python -m harness e2e`: the command line of both e2e modes, a whole real model with every layer's attention
replaced by ours, against transformers.

    inference (infer.py): prefill logits, greedy tokens, built-ins' KV-cache decoding; the table per prompt
    --train (train.py):   the loss and every parameter's gradient, then optimizer steps
    --paged (paged.py):   the model served through a paged kernel, the harness's pages and cache writes; the verdict
                          names the first step and layer that differ (paged_verdict.py)
    -> report.py prints and writes the result (JSON with --json); exit 0 pass, 1 fail, 2 bad input
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness.checkpoints.validate import input_file, output_path
from harness.common import WEEK_S, Parser, UserError, resolve_device, write_json
from harness.e2e.infer import run_e2e
from harness.e2e.model import DEFAULT_MODEL, load_model, narrow_window
from harness.e2e.paged import run_paged_e2e
from harness.e2e.paged_verdict import verdict
from harness.e2e.prompts import read_prompts
from harness.e2e.report import infer_json, paged_json, paged_report, report, train_json, train_report
from harness.e2e.train import run_train
from harness.verify.plugins import LAYOUTS, resolve
from harness.verify.worker import Fault
from impl import CORES

MAX_TOKENS = 1 << 16  # greedy tokens per prompt: past any model's context here
MAX_STEPS = 100_000  # optimizer steps: a check, not a training run
MAX_PAGE = 1 << 16  # slots per page: past any prompt here (one page holds a whole sequence)
DEFAULT_PAGE = 16


def parse(argv) -> argparse.Namespace:
    """The options, checked: every bad value is a one-line UserError (exit 2) before anything loads."""
    p = Parser(
        prog="attention-verify e2e",
        description="Swap an attention implementation into every layer of a real model; compare logits and "
        "greedy tokens with transformers.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default), gemma3-270m, "
                   "hf:OWNER/NAME[@REV], or a directory")
    p.add_argument("--impl", help="a layer: a built-in (naive, loop, tiled, sdpa) or module:function (default tiled)")
    p.add_argument("--module", help="a module factory module:build, build(config, weights) -> layer")
    p.add_argument("--weights-layout", choices=LAYOUTS, default="hf", help="q/k row order: hf (default) or meta")
    p.add_argument("--prompts", help="a text file with one prompt per line, or a JSON list of strings")
    p.add_argument("--paged", metavar="SPEC", help="serve the model through a paged KV-cache kernel instead: a "
                   "built-in (paged_naive, paged_split, paged_triton) or module:function of the --paged contract, "
                   "with the harness's own pages and cache writes")  # fmt: skip
    p.number("--page-size", lo=1, hi=MAX_PAGE, kind=int, metavar="N",
             help=f"slots per page with --paged (default {DEFAULT_PAGE})")  # fmt: skip
    p.number("--tokens", lo=1, hi=MAX_TOKENS, kind=int, default=32,
             help="greedy tokens to generate per prompt (default 32)")  # fmt: skip
    p.number("--sliding-window", lo=1, hi=MAX_TOKENS, kind=int, metavar="W",
             help="run every sliding layer with a window of W keys, transformers and the implementation alike "
             "(the model's own is larger than short prompts: Gemma 3's 512)")  # fmt: skip
    p.add_argument("--train", action="store_true", help="training instead: one forward and backward (loss and every "
                   "parameter's gradient), then optimizer steps, against transformers")  # fmt: skip
    p.number("--steps", lo=0, hi=MAX_STEPS, kind=int, default=10, help="AdamW steps with --train (default 10)")
    p.number("--timeout", lo=0, hi=WEEK_S, above=True, unit="seconds", default=1800.0, metavar="SECONDS",
             help="for the whole model run (default 1800): past it, stage timeout")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--json", type=Path, help="write the result as JSON to this path")
    a = p.parse_args(argv)
    if a.json:
        output_path(a.json, "--json")
    if a.prompts is not None:
        input_file(a.prompts, "--prompts", "give a text file with one prompt per line, or a JSON list")
    resolve_device(a.device)  # one that exists, before the model loads
    if a.impl and a.module:
        raise UserError("give --impl or --module, not both")
    if a.paged and (a.impl or a.module or a.train):
        raise UserError("--paged runs the model through a paged kernel: drop --impl, --module and --train")
    if a.page_size is not None and not a.paged:
        raise UserError("--page-size goes with --paged SPEC; add it or drop --page-size")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    prompts = read_prompts(a.prompts)
    if a.paged:
        return paged_main(a, prompts)
    spec, contract = (a.module, "module") if a.module else (a.impl or "tiled", "layer")
    device = resolve_device(a.device)
    impl = resolve(spec, contract, layout=a.weights_layout, device=str(device))

    t0 = time.perf_counter()
    impl.prepare(a.timeout)
    model = _loaded(a, device)
    core = CORES.get(spec) if impl.builtin else None  # built-ins also decode with impl.decode's KV cache
    impl.deadline = time.monotonic() + a.timeout
    if a.train:
        return train_main(a, model, impl, spec, contract, prompts, t0, str(device))
    results, fault = _guarded(impl, spec, lambda: run_e2e(model, impl, core, prompts, a.tokens))
    results = results or []
    seconds = time.perf_counter() - t0
    if fault is None:
        report(model, spec, results, a.tokens)
    passed = fault is None and all(r.passed for r in results)
    ok = sum(r.passed for r in results)
    print(f"\n{'PASS' if passed else 'FAIL'}: {ok}/{len(prompts)} prompts, {spec} on {model.name}, {seconds:.1f} s")
    if a.json:
        doc = infer_json(a.model, spec, contract, str(device), passed, fault, a.tokens, results, seconds)
        write_json(a.json, doc | {"sliding_window": a.sliding_window})  # null: the model's own
    return 0 if passed else 1


def _loaded(a, device):
    """The model on its device, its windows narrowed where --sliding-window asks; one line saying so."""
    model = load_model(a.model)
    if a.sliding_window:
        narrow_window(model, a.sliding_window)
    model.lm.to(device)
    print(f"loaded {model.name} ({model.source}) in {model.seconds:.1f} s, on {device}")
    return model


def _guarded(impl, spec: str, run):
    """(run(), None), or (None, the fault) printed as the verdict's line; the worker closed either way."""
    try:
        return run(), None
    except Fault as e:
        print(f"FAIL: stage {e.stage}: {spec} {e.message}")
        return None, e
    finally:
        impl.close()


def paged_main(a, prompts: list[str]) -> int:
    """--paged: the model served through the paged kernel; its table, verdict and exit code."""
    device = resolve_device(a.device)
    impl = resolve(a.paged, "paged", device=str(device))  # a name no contract knows: one line, before the model
    page = a.page_size or DEFAULT_PAGE
    t0 = time.perf_counter()
    impl.prepare(a.timeout)
    model = _loaded(a, device)
    impl.deadline = time.monotonic() + a.timeout

    def run():
        result = run_paged_e2e(model, impl, prompts, a.tokens, page_size=page)
        return result, verdict(model, impl, result)  # the probes ask the kernel: before its worker closes

    pair, fault = _guarded(impl, a.paged, run)
    result, v = pair if pair is not None else (None, None)
    seconds = time.perf_counter() - t0
    if fault is None:
        paged_report(model, a.paged, result, v)
    passed = fault is None and result.passed
    ok = sum(p.passed for p in result.prompts) if result else 0
    print(f"\n{'PASS' if passed else 'FAIL'}: {ok}/{len(prompts)} prompts, paged {a.paged} (page {page}) on "
          f"{model.name}, {seconds:.1f} s")  # fmt: skip
    if a.json:
        write_json(a.json, paged_json(a.model, a.paged, str(device), passed, fault, a.tokens, result, v, seconds)
                   | {"sliding_window": a.sliding_window})  # fmt: skip
    return 0 if passed else 1


def train_main(a, model, impl, spec: str, contract: str, prompts: list[str], t0: float, device: str) -> int:
    """--train: the training check, its report and exit code."""
    print(f"training {model.name} with {spec} in every layer: {len(prompts)} prompts, {a.steps} AdamW steps")
    result, fault = _guarded(impl, spec, lambda: run_train(model, impl, prompts, steps=a.steps))
    seconds = time.perf_counter() - t0
    if fault is None:
        train_report(result)
    passed = fault is None and result.passed
    print(f"\n{'PASS' if passed else 'FAIL'}: training {spec} on {model.name}, {seconds:.1f} s")
    if a.json:
        doc = train_json(a.model, spec, contract, device, passed, fault, result, seconds)
        write_json(a.json, doc | {"sliding_window": a.sliding_window})
    return 0 if passed else 1
