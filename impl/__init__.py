"""From-scratch attention, as it runs in Llama, Qwen2/3, Mistral, Gemma 2/3, GPT-OSS and Phi-3. Never imports
transformers.

Two of the harness's three plug-in contracts are met by the built-ins (the third, `module`, is a factory
`build(config, weights) -> layer` with `layer(x, position_ids, attention_mask=None)`: see the README).

The layer contract (every entry of IMPLEMENTATIONS):

    attention(x, weights, *, config, position_ids, attention_mask=None) -> Tensor
      x              [batch, seq, hidden_size], float32 / bfloat16 / float16 (float64: an exact reference)
      weights        dict, nn.Linear layout [out, in], dtype of x: "q_proj" [H*d, hidden], "k_proj" [Hkv*d, hidden],
                     "v_proj" [Hkv*d, hidden], "o_proj" [hidden, H*d]; and where the family has them
                     "q_proj.bias" [H*d], "k_proj.bias" / "v_proj.bias" [Hkv*d], "o_proj.bias" [hidden] (Qwen2,
                     GPT-OSS), "q_norm" / "k_norm" [d] (the stored RMSNorm weight, applied per head before RoPE as
                     the family does: Qwen3 w, Gemma 3 (1 + w)), "sinks" [H] (GPT-OSS)
      config         dict, the model's transformers 5 config: hidden_size, num_attention_heads, num_key_value_heads,
                     head_dim, rope_parameters (flat, or keyed by layer type as Gemma 3's), model_type, and where
                     the family has them partial_rotary_factor, sliding_window, query_pre_attn_scalar,
                     attn_logit_softcapping, rms_norm_eps; plus layer_idx and layer_type ("full_attention" or
                     "sliding_attention")
      position_ids   int64 [batch, seq], any values (contiguous, offset, restarting, sparse)
      attention_mask None or [batch, seq] of 1 = token, 0 = padding
      returns        [batch, seq, hidden_size], dtype of x: causal self-attention with RoPE, no dropout

Every built-in is one layer parametrised by the config (impl/layer.py), not a copy per family: a Llama config and
weights run exactly the Llama layer.

Pieces, one concept per file: rope (frequencies, tables, both pairings, partial rotary, per-layer-type parameters),
gqa (repeat_kv, grouping), masks (and the variants' math: window, softcap, sinks), projection (stage 1 with biases
and q/k norms, and the output projection), layer (the family's kernel keywords, the layer around any core), naive,
loop, tiled (FlashAttention-2 style, forward and backward in PyTorch: tiled, tiled_forward, tiled_backward, tiles),
flash_triton (FlashAttention-2 forward and backward kernels in Triton), sdpa, decode (KV cache); the serving path:
paged (a paged KV cache: the textbook and flash-decoding), paged_triton (a Triton paged decode kernel), varlen
(packed batches); the sharded path: ring (ring attention over torch.distributed: ring_layout, ring_forward,
ring_backward, and the all-gather baseline).
"""

from impl import flash_triton, loop, naive, paged, paged_triton, ring, sdpa, tiled, varlen

IMPLEMENTATIONS = {
    "naive": naive.attention,
    "loop": loop.attention,
    "tiled": tiled.attention,
    "sdpa": sdpa.attention,
    "triton": flash_triton.attention,
}

# The core contract (every entry of CORES): the kernel between the projections and the output projection.
#   attn(q, k, v, *, causal=True, scale=None, attention_mask=None, window=None, softcap=0.0, sinks=None)
#     -> out or (out, lse)
#     q [B, H, Sq, d]; k, v [B, Hkv, Sk, d] (KV head j serves query heads j*g .. j*g+g-1, g = H / Hkv)
#     positions bottom-right aligned: query i sits at p = Sk - Sq + i; scale None means 1/sqrt(d)
#     causal: key j visible only if j <= p
#     attention_mask None or [B, Sk] of 1 = key, 0 = padding
#     window None or (left, right), FlashAttention's window_size: key j visible only if p - left <= j <= p + right;
#       -1 or None on a side: unbounded; ANDed with causal (transformers' sliding_window=W is causal, (W - 1, 0))
#     softcap 0.0 = off; else, after the scale, s = softcap * tanh(s / softcap), the mask added after the cap
#     sinks None or float32 [H]: one logit per query head in the softmax's denominator, with no value (GPT-OSS)
#     out [B, H, Sq, d] in q's dtype, 0 where a row sees no key; lse [B, H, Sq] float32, natural log of the whole
#       denominator (the sink included): -inf where a row sees no key, the sink logit with sinks
#   impl/masks.py writes the variants' math out; backward (autograd): gradients for q, k, v and the sinks.
CORES = {"naive": naive.core, "loop": loop.core, "tiled": tiled.core, "sdpa": sdpa.core, "triton": flash_triton.core}

# The paged contract (every entry of PAGED; impl/paged.py says more): attention of each sequence's last Sq tokens
# against its keys and values in a paged KV cache.
#   attn(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None, softcap=0.0,
#        sinks=None) -> out or (out, lse)
#     q [B, H, Sq, d]: the last Sq tokens of each sequence (Sq = 1 decode, > 1 chunked prefill), already in the cache
#     k_cache, v_cache [num_blocks, page_size, Hkv, d]; block_table [B, max_blocks] int32: token t of sequence b is
#       at block block_table[b, t // page_size], slot t % page_size; cache_seqlens [B] int32: lengths, new tokens
#       included. Query i of sequence b sits at p = cache_seqlens[b] - Sq + i (bottom-right, as the core contract).
#       Slots past a sequence's length are arbitrary (NaN in the harness): never read.
#     window, softcap, sinks as the core contract; out [B, H, Sq, d] in q's dtype; lse [B, H, Sq] float32
PAGED = {"paged_naive": paged.paged_naive, "paged_split": paged.paged_split, "paged_triton": paged_triton.paged_triton}

# The varlen contract (every entry of VARLEN; impl/varlen.py): a packed batch without padding, FlashAttention's
# flash_attn_varlen_func convention.
#   attn(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None, window=None,
#        softcap=0.0, sinks=None) -> out or (out, lse)
#     q [total_q, H, d]; k, v [total_k, Hkv, d]; cu_seqlens_q / _k int32 [B + 1]: sequence b is rows cu[b] ..
#     cu[b + 1] - 1; it sees only its own keys, causal bottom-right (query i at len_k_b - len_q_b + i)
#     out [total_q, H, d] in q's dtype; lse [H, total_q] float32
VARLEN = {"varlen_tiled": varlen.varlen_tiled}

# The ring contract (every entry of RING; impl/ring.py): context parallelism, the sequence sharded across the ranks of
# a torch.distributed group; called on every rank with its own shard.
#   attn(q, k, v, *, group, causal=True, scale=None, layout="contiguous") -> out or (out, lse)
#     q [B, H, S/W, d]; k, v [B, Hkv, S/W, d]: this rank's tokens (GQA as the core contract); group: the process
#     group (dist.get_rank(group), dist.get_world_size(group), dist.get_global_rank(group, r) for p2p peers)
#     layout "contiguous": rank r holds tokens [r*S/W, (r+1)*S/W); "zigzag": 2W equal chunks, rank r holds chunk r
#       then chunk 2W-1-r (impl/ring_layout.py); fn.layouts declares the ones it runs (default ("contiguous",))
#     causal by GLOBAL positions: key t visible from query p iff t <= p; scale None means 1/sqrt(d)
#     out [B, H, S/W, d] in q's dtype; lse [B, H, S/W] float32 natural log (float64 inputs: float64, as the cores)
#     backward (autograd): dq for this rank's queries; dk, dv for its shard with every rank's queries' shares
#     communication through torch.distributed's module attributes at call time (dist.isend, dist.all_gather, ...)
RING = {"ring": ring.ring, "ring_zigzag": ring.ring_zigzag, "allgather": ring.allgather}

# Run in Triton's interpreter when their inputs are on a CPU (correct, but Python-speed): the harness gives them a
# shorter scenario list there.
INTERPRETED_ON_CPU = {"triton"}



def context_of(result):
    """A core's result -> its output: cores return out or (out, lse)."""
    return result[0] if isinstance(result, tuple) else result


__all__ = ["IMPLEMENTATIONS", "CORES", "PAGED", "VARLEN", "RING", "INTERPRETED_ON_CPU", "context_of"]
