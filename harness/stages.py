"""The diagnosis's vocabulary: the stages a verdict can name, forward first, then the backward pass.

A leaf module (it imports nothing from harness): the bug catalog tags each bug with the stage it breaks, the
diagnosis names one of these for a failing implementation, and the mutation suite checks the two agree.
"""

STAGES = (
    "projection",
    "qkv_bias",
    "head_layout",
    "qk_norm",
    "gqa",
    "rope",
    "partial_rotary",
    "rope_frequencies",
    "rope_precision",
    "scale",
    "softcap",
    "causal_mask",
    "padding_mask",
    "sliding_window",
    "softmax",
    "sinks",
    "softmax_precision",
    "accumulation_precision",
    "tiling",
    "lse",
    # the serving path (--paged, --varlen): which keys a sequence reads, and how split partial results combine
    "block_table",
    "seqlens",
    "varlen_boundary",
    "split_merge",
    # context parallelism (--ring): how partial results combine, which keys a block shows, which block is where
    "ring_merge",
    "ring_mask",
    "ring_order",
    "output_projection",
    "nonfinite",
    "unknown",
    # the backward pass (verify --grad)
    "grad_softmax",
    "grad_scale",
    "grad_mask",
    "grad_gqa",
    "grad_rope",
    "grad_projection",
    "grad_nonfinite",
    "grad_unknown",
)
