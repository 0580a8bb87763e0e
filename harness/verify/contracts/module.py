"""The module contract (`--module`): the layer contract (layer.py) with a factory instead of a function, for code
that holds its weights in a module (ports of model code: Meta's llama-models, gpt-fast, litgpt, torchtune).

    build(config, weights) -> layer;  layer(x, position_ids, attention_mask=None) -> [B, S, hidden_size]

build runs once per fixture and dtype (in the worker); everything else is the layer contract's. config is the
fixture's config plus the sizes of the scenarios that will run for this implementation on this fixture, so that
build can size its caches and rotary tables (names exact):

    max_batch_size  the largest batch of any call
    max_seq_len     the longest sequence of any call
    max_position    the largest position id of any call (beyond_context reaches up to 2 x max_position_embeddings)

Gradients (--grad) run on some of the same scenarios, under the same sizes. A diagnosis probe may be longer than
any scenario (the precision probes' 512 tokens under --quick): each probe call is built anew and told the larger
of the run's sizes and its own input's, so no call ever goes beyond what its build was told.
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
