"""The static KV cache's decode attention over a span of positions (``kv_cache.spans_for``): the same output as
over the whole cache, since every row's positions lie below the span."""

from __future__ import annotations

import types

import pytest
import torch

from hotswap_core.kv_cache import KVCache, decode_view, spans_for, static_cache_attention
from hotswap_core.scheduler import RowTable


def test_spans_are_powers_of_two_up_to_the_context() -> None:
    assert spans_for(256) == (64, 128, 256)
    assert spans_for(4096) == (64, 128, 256, 512, 1024, 2048, 4096)
    assert spans_for(300) == (64, 128, 256, 300)
    assert spans_for(64) == (64,) and spans_for(6) == (6,)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_decode_attention_over_a_span_equals_attention_over_the_whole_cache(kv_heads: int) -> None:
    torch.manual_seed(0)
    rows, heads, max_seq_len, head_dim = 4, 4, 256, 8
    cache = KVCache(1, rows, kv_heads, max_seq_len, head_dim, torch.device("cpu"), torch.float32)
    cache.k[0].normal_()
    cache.v[0].normal_()
    positions = torch.tensor([[5], [63], [0], [40]])  # all below 64
    query = torch.randn(rows, heads, 1, head_dim)
    key, value = torch.randn(rows, kv_heads, 1, head_dim), torch.randn(rows, kv_heads, 1, head_dim)
    layer = types.SimpleNamespace(layer_idx=0)
    outs = []
    for span in (64, 128, 256):
        view = decode_view(cache, positions, torch.arange(span))
        assert view.mask is not None and view.mask.shape == (rows, 1, 1, span)
        out, _ = static_cache_attention(layer, query, key, value, None, hotswap_kv=view)  # type: ignore[arg-type]
        outs.append(out)
    # Garbage past a row's position is never read: it changes nothing.
    cache.k[0][:, :, 64:] = 1e4
    view = decode_view(cache, positions, torch.arange(256))
    outs.append(static_cache_attention(layer, query, key, value, None, hotswap_kv=view)[0])  # type: ignore[arg-type]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_a_step_spans_the_furthest_running_row() -> None:
    table = RowTable(4)
    assert table.span((64, 128, 256)) == 64  # idle

    def row(index: int, position: int, prefilling: bool = False) -> types.SimpleNamespace:
        return types.SimpleNamespace(index=index, position=position, prefilling=prefilling)

    table.rows[0] = row(0, 10)  # type: ignore[assignment]
    assert table.span((64, 128, 256)) == 64
    table.rows[2] = row(2, 63)  # type: ignore[assignment]  # attends to positions 0..63: 64 of them
    assert table.span((64, 128, 256)) == 64
    table.rows[3] = row(3, 64)  # type: ignore[assignment]
    assert table.span((64, 128, 256)) == 128
    table.rows[3] = row(3, 255)  # type: ignore[assignment]
    assert table.span((64, 128, 256)) == 256
    table.rows[3] = row(3, 255, prefilling=True)  # type: ignore[assignment]  # takes no decode step: not spanned
    assert table.span((64, 128, 256)) == 64
