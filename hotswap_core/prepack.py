"""CPU linears on oneDNN's prepacked weights (``model.cpu_linear``).

On a CPU, ``F.linear`` hands a decode step's few rows to a GEMM that is tuned for large ones: at Qwen2.5-1.5B's
head (151,936 x 1,536, float32, 2 cores) 8 rows take 178 ms through ``F.linear`` and 57 ms through oneDNN with
the weight reordered once into its blocked layout (MLP projections: 9.0 -> 3.4 ms). That reorder is what
inductor's ``freezing`` does, but freezing folds every parameter into the graph as a constant, the LoRA slots
and the per-row slot index with them, and those change in place at every swap and step. So the base model's
linears are replaced here, before compiling, by ``PackedLinear``: its weight reordered once and kept out of
the graph (a handle into a table), called through a custom op that dynamo and inductor treat as opaque. The
LoRA path (``SlotLinear``) and everything else stay as they were.

Only matrices of at least ``MIN_WEIGHTS`` entries are packed: below that oneDNN gains nothing, and each call
costs a Python dispatch (about 10 us), which on the demo model would be a tenth of a step. CUDA is never
touched: cuBLAS needs no such help.
"""

from __future__ import annotations

import itertools
import logging
import weakref

import torch
from torch import nn

from hotswap_core.errors import EngineError

log = logging.getLogger("hotswapd.engine")

MIN_WEIGHTS = 1 << 20
# oneDNN picks its blocking for this many rows; any other count still works. A decode step's rows.
BATCH_HINT = 8

_PACKED: dict[int, torch.Tensor] = {}  # handle -> reordered weight (an opaque mkldnn tensor)
# Handles count from 0 in each process, so a daemon's graphs are the same from one start to the next and the
# inductor cache (which keys on the graph, handles included) serves a warm start.
_handles = itertools.count()


@torch.library.custom_op("hotswapd::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` the weight packed under ``handle``."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), _PACKED[handle], bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: int, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight oneDNN reordered once; the original weight is not kept."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.handle = next(_handles)
        _PACKED[self.handle] = packed
        weakref.finalize(self, _PACKED.pop, self.handle, None)  # the table never outlives the module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.handle, self.bias, self.out_features)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn_prepacked=True"


def use_onednn(choice: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``model.cpu_linear: choice`` packs this model's linears. ``auto``: on a CPU with oneDNN, in
    float32; ``onednn``: on a CPU in float32 or bfloat16, an error where oneDNN is missing; ``aten``: never."""
    if choice == "aten" or device.type != "cpu":
        return False
    available = bool(torch.backends.mkldnn.is_available())
    if choice == "onednn":
        if not available:
            raise EngineError("model.cpu_linear is 'onednn', but this torch build has no oneDNN (mkldnn)")
        if dtype not in (torch.float32, torch.bfloat16):
            raise EngineError(f"model.cpu_linear 'onednn' packs float32 or bfloat16 weights, not {dtype}")
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise EngineError(
                "model.cpu_linear is 'onednn' with bfloat16, but this CPU has no oneDNN bfloat16 support "
                "(AVX-512 BF16 or AMX): use float32, or cpu_linear 'aten'"
            )
        return True
    return available and dtype == torch.float32


def prepack_linears(model: nn.Module, min_weights: int | None = None) -> tuple[int, int]:
    """Replace every ``nn.Linear`` of ``model`` (PEFT's ``base_layer``s and the output head included) with at
    least ``min_weights`` (default ``MIN_WEIGHTS``) weights by a ``PackedLinear``. Returns (linears packed,
    bytes of packed weights)."""
    least = MIN_WEIGHTS if min_weights is None else min_weights
    count = nbytes = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.numel() >= least:
                setattr(parent, name, PackedLinear(child))
                count += 1
                nbytes += child.weight.numel() * child.weight.element_size()
    return count, nbytes
