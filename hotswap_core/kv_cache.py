"""The static KV cache and the attention that reads it.

Every layer's keys and values live in one preallocated tensor each, ``[rows, kv_heads, max_seq_len + 1,
head_dim]`` (gpt-fast style; the last position is a spare that steps write to and no step reads). A row of the
cache belongs to one running request from admission to its last token; a token's K/V are written in place at
``(row, position)``. Nothing is ever concatenated or reallocated, so a decode step has the same shapes every
time: one compiled graph per batch-size bucket, and on CUDA one CUDA graph per batch-size bucket and attention
span.

A decode step attends to the first ``span`` positions of its rows, not to all ``max_seq_len``: the smallest
of ``spans_for(max_seq_len)`` (powers of two) that holds the furthest running row's position. Reading the
whole cache every step would make every token cost what a token at the end of the context costs (at a
32k context, most of a step's memory traffic). The span is a symbolic size of the one decode graph per
batch-size bucket, so spans add no compilation; on CUDA each (bucket, span) pair is one recorded graph.

The model's own attention modules keep their projections, rotary embedding and LoRA layers; only the
attention kernel is ours (registered with transformers' ``AttentionInterface`` as ``"hotswapd"``). It
gets the step's cache rows and positions through the forward's keyword arguments (``hotswap_kv``), which
transformers passes down to every attention call. Grouped-query attention goes to SDPA with
``enable_gqa``, so repeated K/V are never materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION = "hotswapd"
SMALLEST_SPAN = 64


def spans_for(max_seq_len: int, smallest: int = SMALLEST_SPAN) -> tuple[int, ...]:
    """Attention spans of decode steps: powers of two from ``smallest`` below ``max_seq_len``, and
    ``max_seq_len``."""
    out, span = [], smallest
    while span < max_seq_len:
        out.append(span)
        span *= 2
    return (*out, max_seq_len)


class KVCache:
    """Preallocated K and V for ``rows`` rows of ``max_seq_len`` positions, for every layer."""

    def __init__(
        self,
        layers: int,
        rows: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        # One position more than the context holds: a decode step's span (at most max_seq_len) is then never the
        # whole tensor, and its slice of the cache never has to be guarded on (dynamo would guard span !=
        # max_seq_len, a contiguity case, which contradicts the span's declared range: a graph per span).
        shape = (rows, kv_heads, max_seq_len + 1, head_dim)
        self.rows, self.max_seq_len = rows, max_seq_len
        # What a written K/V value is clamped to: a product of a key this large with any query a sound row makes
        # (below it too) stays finite over head_dim terms, in float32 (what attention scores are computed in, for
        # float16 caches as well: whose own range is smaller, and left as it is).
        self.bound = min(torch.finfo(dtype).max, math.sqrt(torch.finfo(torch.float32).max / head_dim))
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        for t in (*self.k, *self.v):
            # Written in place by every step: CUDA graphs must treat them as fixed addresses, not inputs to copy.
            torch._dynamo.mark_static_address(t)
            # Its sizes are the model's geometry, constants: never symbols that could be equated with a prompt's
            # length (dynamo's duck sizing: a 2-token warm-up prompt on a 2-KV-head model cost a graph).
            torch._dynamo.mark_static(t)

    @classmethod
    def for_model(cls, config: Any, rows: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, rows, kv_heads, max_seq_len, head_dim, device, dtype)

    def copy_prefix(self, source: int, rows: list[int], length: int) -> None:
        """Positions ``0 .. length - 1`` of cache row ``source`` into ``rows``, every layer (in place: the tensors
        keep their addresses, which recorded CUDA graphs hold)."""
        index = torch.tensor(rows, device=self.k[0].device)
        for t in (*self.k, *self.v):
            t[index, :, :length] = t[source, :, :length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass
class StepView:
    """What one forward writes to and reads from the cache.

    Prefill (``decode_rows`` is None): batch row ``i`` is cache row ``rows[i]``. A prompt's first chunk starts
    at position 0, so attention is causal over the step's own keys (right padding is never attended to by a
    real token). A later chunk (``past``: ``arange(S)``, S past the furthest chunk's end) attends to its row's
    cached positions up to each query's own, its own keys included (written first). Decode: batch row ``i``
    *is* cache row ``i`` of the first ``decode_rows`` rows (a view, no gather); each row attends to the
    positions up to its own (``mask``) among the first ``span``.

    Positions past a row's tokens (padding, rows nobody holds) are written with whatever the step computed
    there and never read: a row reads a position only after its own token there was written. Past the context,
    such positions are ``max_seq_len``, the cache's one spare position, which no span reaches.
    """

    cache: KVCache
    rows: torch.Tensor  # [B] cache row of each batch row
    positions: torch.Tensor  # [B, q] position of each query token
    decode_rows: int | None = None
    mask: torch.Tensor | None = None  # decode: [B, 1, 1, span], True where a row may attend
    past: torch.Tensor | None = None  # a later chunk's prefill: arange(S), the positions it may read


def decode_view(cache: KVCache, positions: torch.Tensor, seen: torch.Tensor) -> StepView:
    """The view of a decode step over cache rows ``0 .. n-1``; ``positions``: [n, 1]; ``seen``: the positions
    attended to, ``arange(span)`` (its length is the step's span: every row's position is below it). Traceable."""
    n = positions.shape[0]
    rows = torch.arange(n, device=positions.device)
    mask = (seen[None, :] <= positions)[:, None, None, :]  # [n, 1, 1, span]
    return StepView(cache, rows, positions, decode_rows=n, mask=mask)


def static_cache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, q, head_dim]
    key: torch.Tensor,  # [B, kv_heads, q, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    hotswap_kv: StepView | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if hotswap_kv is None:
        raise RuntimeError("hotswapd's attention runs only inside the engine (no hotswap_kv given)")
    view, layer = hotswap_kv, int(module.layer_idx)  # type: ignore[arg-type]  # set by every attention module
    k_cache, v_cache = view.cache.k[layer], view.cache.v[layer]
    where = (view.rows[:, None], slice(None), view.positions)  # -> [B, q, kv_heads, head_dim]
    # Never a NaN, an infinity or a value whose scores overflow in the cache: attention reads a row's positions past
    # its own too, masked, and a masked NaN still poisons the output (0 x NaN), as does a masked score that
    # overflowed (inf - inf, where the mask is added). A row whose activations blew up (a candidate failing its smoke
    # prompt, say) would otherwise leave them for the next request placed in that row. A sound row's values are
    # far inside the bound (view.cache.bound): it changes nothing for them.
    bound = view.cache.bound
    k_cache[where] = torch.nan_to_num(key.transpose(1, 2), nan=0.0, posinf=0.0, neginf=0.0).clamp(-bound, bound)
    v_cache[where] = torch.nan_to_num(value.transpose(1, 2), nan=0.0, posinf=0.0, neginf=0.0).clamp(-bound, bound)
    gqa = query.shape[1] != key.shape[1]
    if view.decode_rows is None and view.past is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    elif view.decode_rows is None:
        assert view.past is not None
        span = view.past.shape[0]
        mask = (view.past[None, None, :] <= view.positions[:, :, None])[:, None]  # [B, 1, q, S]
        out = F.scaled_dot_product_attention(
            query, k_cache[view.rows, :, :span], v_cache[view.rows, :, :span], attn_mask=mask, scale=scaling,
            enable_gqa=gqa,
        )  # fmt: skip
    else:
        assert view.mask is not None  # decode_view always makes one
        n, span = view.decode_rows, view.mask.shape[-1]
        out = F.scaled_dot_product_attention(
            query, k_cache[:n, :, :span], v_cache[:n, :, :span], attn_mask=view.mask, scale=scaling, enable_gqa=gqa
        )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """transformers builds no mask for our attention: the kernel derives it from the step's positions."""
    return None


def register() -> None:
    """Make ``attn_implementation="hotswapd"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, static_cache_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)
