"""The module contract (`--module`): the layer contract (layer.py) with a factory instead of a function, for code
that holds its weights in a module (ports of model code: Meta's llama-models, gpt-fast, litgpt, torchtune).

    build(config, weights) -> layer;  layer(x, position_ids, attention_mask=None) -> [B, S, hidden_size]

build runs once per fixture and dtype (in the worker); everything else is the layer contract's.
"""

from __future__ import annotations

from harness.verify import serve as serve_fns
from harness.verify.contracts.layer import (  # noqa: F401 - the layer contract's steps, this contract's own
    FAULT_CHECK,
    call,
    cases,
    compare,
    diagnose,
    diagnose_precision,
    evidence,
    not_run,
    reference,
    reference_rows,
    targets,
)

NAME = "module"
OPTION = "--module"
HELP = "modules: module:factory, build(config, weights) -> layer(x, position_ids, attention_mask=None)"
GRAD = "layer_grad"
SERVE = "harness.verify.serve:module"
serve = serve_fns.module


def builtins() -> dict:
    return {}
