"""The layer contract (`--impl`): a whole attention layer, from hidden states to o_proj's output.

    attention(x, weights, *, config, position_ids, attention_mask=None) -> [B, S, hidden_size]

    cases       the scenarios (verify/scenarios.py) on each fixture
    reference   the family's own transformers attention module (reference/: LlamaAttention, Qwen3Attention,
                Gemma3Attention, ...) in the scenario's dtype, and in float64 with float64 RoPE tables; checks of the
                reference itself: its sdpa path against its eager path (where transformers' sdpa computes the
                family's attention: not with softcap or sinks), its output against the golden output stored at
                extraction (drift)
    config      the fixture's, plus layer_idx and layer_type ("full_attention" or "sliding_attention"), and
                max_batch_size, max_seq_len and max_position: the largest batch, length and position id of the
                scenarios that will run (what the module contract's build() sizes its caches and rotary tables by;
                a diagnosis probe's call is told the larger of these and its own input's)
    weights     q_proj, k_proj, v_proj, o_proj and the family's extras (q_proj.bias, ..., q_norm, k_norm, sinks),
                in the scenario's dtype
    compared    the output over real (non-padding) rows, under the tolerance policy (compare.py)
    diagnosis   diagnosis/layer.py: suspects, probes, patterns; the precision diagnosis for an imprecise pass
The module contract (module.py) is this one with a factory instead of a function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness import versions
from harness.checkpoints.format import Fixture
from harness.checkpoints.sources.base import half_split_to_interleaved
from harness.common import UserError, compared_rows
from harness.reference import Reference, Reference64, has_sdpa_path
from harness.verify import contracts
from harness.verify import serve as serve_fns
from harness.verify.compare import compare as compare_tensors
from harness.verify.compare import not_run as no_output
from harness.verify.diagnosis import layer as diagnosis
from harness.verify.diagnosis.evidence import Run
from harness.verify.records import Row, dtype_name
from harness.verify.scenarios import BY_NAME, covering, input_sizes, select, sizes, with_sizes
from harness.verify.worker import Fault
from impl import IMPLEMENTATIONS

NAME = "layer"
OPTION = "--impl"
HELP = "layers: built-in names or module:function (attention(x, weights, *, config, position_ids, attention_mask=None))"
GRAD = "layer_grad"
FAULT_CHECK = "forward"
SERVE = "harness.verify.serve:layer"  # what a worker runs (serve.py: the worker need not import the judge)
serve = serve_fns.layer


def builtins() -> dict:
    return IMPLEMENTATIONS


def targets(fixtures: list[Fixture]) -> list[Fixture]:
    return fixtures


def cases(f: Fixture, ctx, impl) -> list:
    """The scenarios for this implementation, each carrying the sizes of them all (announced below)."""
    chosen = select(f, ctx.dtypes, ctx.quick, bool(impl is not None and impl.interpreted))
    key = (f.key, "sizes", tuple(s.name for s in chosen))
    if key not in ctx.cache:
        ctx.cache[key] = sizes(f, chosen)
    return with_sizes(chosen, ctx.cache[key])


def announced(f: Fixture, s) -> tuple[str, dict]:
    """The weights key and the config a case's call sends: the fixture's config plus the sizes of every case of the
    run. The key names the sizes too, so a worker never keeps a module built for smaller ones."""
    sized = dict(s.sizes)
    tag = "".join(f":{v}" for v in sized.values())
    return f"{f.key}:{dtype_name(s.dtype)}{tag}", f.layer_config | sized


# ---------------------------------------------------------------------------------------------------------
# reference


@dataclass
class Case:
    """A scenario's inputs and the references for them (computed once per fixture contents and scenario)."""

    x: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor | None
    ref: torch.Tensor  # HF eager, the scenario's dtype
    ref64: torch.Tensor  # HF in float64 with float64 RoPE tables

    @property
    def keep(self) -> torch.Tensor:
        return compared_rows(self.x, self.mask)


def weights_in(f: Fixture, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype, copy=True) for k, v in f.weights.items()}  # always a copy: never the fixture's own


def on(t, device):
    return None if t is None else t.to(device)


def reference(f: Fixture, s, ctx, device="cpu") -> Case:
    """Inputs, HF eager in the scenario's dtype and HF in float64 (computed on `device`, kept on the CPU), once per
    (fixture contents, scenario, device)."""
    key = (f.key, s.name, str(device))
    cache = ctx.cache
    if key not in cache:
        x, pos, mask = s.build(f, s.dtype)
        w = {k: v.to(device) for k, v in weights_in(f, s.dtype).items()}
        ref = Reference(f.layer_config, w, dtype=s.dtype)(x.to(device), pos.to(device), on(mask, device))
        w64 = {k: v.to(device) for k, v in f.weights.items()}
        ref64 = Reference64(f.layer_config, w64)(x.to(device), pos.to(device), on(mask, device))
        ref, ref64 = ref.cpu(), ref64.cpu()
        keep = compared_rows(x, mask)
        if not (torch.isfinite(ref64[keep]).all() and torch.isfinite(ref[keep]).all()):
            # the judge's own answer is not a number: a fixture problem, never an implementation's fault
            raise UserError(f"{f.path}: transformers' own output is NaN/Inf on scenario {s.name} "
                            f"({dtype_name(s.dtype)}): the fixture's weights do not make a working "
                            "layer; re-extract it from a real checkpoint")  # fmt: skip
        cache[key] = Case(x, pos, mask, ref, ref64)
    return cache[key]


def reference_rows(f: Fixture, scenarios: list, ctx, device="cpu") -> list[Row]:
    """HF eager vs HF sdpa (a check of the reference, where transformers' sdpa computes the family's attention), and
    HF eager vs the stored golden (drift)."""
    rows = []
    w = {k: v.to(device) for k, v in weights_in(f, torch.float32).items()}
    sdpa = Reference(f.layer_config, w, attn_implementation="sdpa") if has_sdpa_path(f.config) else None
    for s in scenarios:
        if s.dtype != torch.float32 or s.probe or sdpa is None:
            continue
        r = reference(f, s, ctx, device)
        t0 = time.perf_counter()
        out = sdpa(r.x.to(device), r.pos.to(device), on(r.mask, device)).cpu()
        c = compare_tensors(out, r.ref, r.ref64, r.keep, s.dtype)
        rows.append(Row(f.name, "hf-sdpa", s.name, "float32", time.perf_counter() - t0, c))
    if f.inputs is not None:
        r = reference(f, BY_NAME["prompt"], ctx, device)
        c = compare_tensors(f.inputs["golden"], r.ref, r.ref64, r.keep, torch.float32)
        made_with = (f.manifest.get("versions") or {}).get("transformers")
        if not c.passed and made_with == versions.installed(("transformers",))["transformers"]:
            # the same transformers gave another output at extraction: the fixture changed, not transformers
            raise UserError(f"{f.path}: the golden output stored at extraction disagrees with transformers "
                            f"{made_with}, the version that wrote it (max abs {c.max_abs_err:.2e}): the weights or "
                            "inputs were changed after extraction (and re-hashed); re-extract the fixture")  # fmt: skip
        rows.append(Row(f.name, "golden", "prompt", "float32", 0.0, c))
    return rows


# ---------------------------------------------------------------------------------------------------------
# the call


def in_layout(weights: dict, config: dict, layout: str) -> dict:
    """q/k rows in the order the implementation reads them: HF's half-split pairs, or Meta's interleaved pairs (the
    q/k biases' entries and the q/k norms' channels permuted with them: they act on the same channels)."""
    if layout != "meta":
        return weights
    heads = rope_heads(config)
    return weights | {n: half_split_to_interleaved(weights[n], h) for n, h in heads.items() if n in weights}


def rope_heads(config: dict) -> dict[str, int]:
    """The tensors whose rows (channels) follow the RoPE pair order, with the heads they hold."""
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    return {"q_proj": H, "k_proj": Hkv, "q_proj.bias": H, "k_proj.bias": Hkv, "q_norm": 1, "k_norm": 1}


def forward(impl, key: str, config: dict, weights: dict, x, pos, mask) -> torch.Tensor:
    """The layer (or module) on these inputs, its reply checked; key names the weights (fixture, dtype) so they
    travel once. Back where x is."""
    c = contracts.get(impl.contract)  # layer or module: they differ only in how serve() calls the code
    t = {"x": x, "position_ids": pos} | ({} if mask is None else {"attention_mask": mask})
    preload = (key, config, in_layout(weights, config, impl.layout))
    descs, items = impl.call(c, {"key": key}, t, "running the layer", preload, expect=x.numel())
    check_output(descs, items[0] if items else None, x, impl.device)
    return items[0].to(x.device)


def call(impl, f: Fixture, s, r: Case) -> torch.Tensor:
    key, config = announced(f, s)
    return forward(impl, key, config, weights_in(f, s.dtype), r.x, r.pos, r.mask)


# ---------------------------------------------------------------------------------------------------------
# the reply, checked against the contract


def contract_error(what: str, desc: dict, want: str) -> Fault:
    got = desc.get("type") if desc.get("type") != "tensor" else (
        f"a {desc['layout']} tensor {desc['shape']} {desc['dtype']} on {desc['device']}")  # fmt: skip
    return Fault("contract", f"{what}: returned {got}, expected {want} (see the contract)")


def check_tensor(what: str, desc: dict, t, shape, dtype, device) -> None:
    want = f"a tensor {list(shape)} {dtype_name(dtype)} on {device}"
    if desc.get("type") != "tensor" or not desc.get("sendable") or t is None:
        raise contract_error(what, desc, want)
    if desc["shape"] != list(shape) or desc["dtype"] != dtype_name(dtype) or desc["device"] != str(device):
        raise contract_error(what, desc, want)


def check_output(descs: list[dict], out, x: torch.Tensor, device=None) -> None:
    """A layer's output: one tensor of x's shape and dtype, on the device the implementation was given."""
    if len(descs) != 1 or descs[0].get("in_tuple"):
        raise Fault("contract", f"the layer returned a tuple of {len(descs)}, expected one tensor {list(x.shape)}")
    check_tensor("the layer", descs[0], out, x.shape, x.dtype, torch.device(device or x.device))


# ---------------------------------------------------------------------------------------------------------
# comparison and diagnosis


def not_run(s, r: Case):
    return no_output(r.ref, s.dtype)


def compare(f: Fixture, s, r: Case, out: torch.Tensor) -> list:
    return [("forward", compare_tensors(out, r.ref, r.ref64, r.keep, s.dtype))]


def evidence(f: Fixture, s, r: Case, out: torch.Tensor) -> Run:
    return Run(r.x, r.pos, r.mask, out, r.ref, s.dtype, r.ref64)


def prober(impl, f: Fixture, ctx):
    """call(x, weights, pos, mask): the implementation again, on the diagnosis's own inputs and weights. Each call
    is built anew (its own key) and told the sizes of the run or of its inputs, whichever is larger: a probe may
    be longer than any scenario of --quick (the precision probes' 512 tokens)."""
    n = [0]
    chosen = cases(f, ctx, impl)
    run_sizes = dict(chosen[0].sizes) if chosen else {}

    def probe(x, w, pos, mask):
        n[0] += 1
        config = f.layer_config | covering(run_sizes, input_sizes(x, pos))
        return forward(impl, f"{f.key}:probe{n[0]}", config, w, x, pos, mask)

    return probe


def diagnose(f: Fixture, runs: dict, failed: dict, passing: list, impl, ctx):
    return diagnosis.diagnose(f, runs, list(failed), passing, call=prober(impl, f, ctx),
                              fn=getattr(impl, "fn", None))  # fmt: skip


def diagnose_precision(f: Fixture, runs: dict, imprecise: list, impl, ctx):
    return diagnosis.diagnose_precision(f, runs, imprecise, prober(impl, f, ctx))
