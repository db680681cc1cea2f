"""Two LoRA slots in one compiled graph.

Every LoRA module of the layout holds its A and B weights for *both* slots in one padded tensor
(``A: [2, R, in]``, ``B: [2, out, R]``, ``scale: [2]``), and one shared per-row ``slot`` index tensor
(``[rows]``) says which slot each row of the batch uses: rows of two versions share a forward. So:

* a row keeps the slot that was live when it was admitted, to its last token (pinned: reference
  counts); commit only changes which slot *new* rows get — no Python attribute changes for dynamo to
  guard on, so one set of compiled graphs serves both slots and nothing recompiles;
* staging writes only the standby half with ``copy_`` (storage never rebound, so inductor and CUDA
  graphs keep their pointers) while the live half keeps serving, and never while a row is pinned to it;
* per-module scalings (``rank_pattern``/``alpha_pattern``/``use_rslora``) are data, not constants.

The modules are installed into PEFT's own ``LoraLayer``s (``lora_A["default"]``/``lora_B["default"]``),
so PEFT's forward, dtype casting and target matching stay in charge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from hotswap_core.layout import Layout

ADAPTER_NAME = "default"


@dataclass(frozen=True)
class AdapterVersion:
    """What a slot holds: enough to name it in responses and to re-stage it from disk."""

    version: str
    sha256: str
    source: str = "directory"
    path: str | None = None

    @property
    def is_base(self) -> bool:
        return self.source == "base"


BASE_VERSION = AdapterVersion(version="base", sha256="0" * 64, source="base")


class SlotLinear(nn.Module):
    """A bias-free Linear whose weight is one of two slots, chosen per batch row by a shared index tensor."""

    def __init__(self, weight: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [2, out, in]
        self.slot: torch.Tensor
        self.register_buffer("slot", slot, persistent=False)  # [rows] long, shared by every module
        self.scale: torch.Tensor | None
        if scale is not None:
            self.register_buffer("scale", scale, persistent=False)  # [2] float32
        else:
            self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, in], or [B, in] (the output head's input)
        if x.dim() == 2:  # one position per row: a batched matmul needs the position axis
            return self.forward(x[:, None])[:, 0]
        slot = self.slot[: x.shape[0]]  # [B]: the slot of each batch row
        w = torch.index_select(self.weight, 0, slot)  # [B, out, in]
        y = torch.matmul(x, w.transpose(1, 2))  # [B, L, out]
        if self.scale is not None:
            # Cast so a bf16 activation is not promoted to fp32 (PEFT's own scaling is a 0-d tensor).
            y = y * torch.index_select(self.scale, 0, slot).to(y.dtype)[:, None, None]
        return y


@dataclass
class _ModuleSlots:
    a: SlotLinear  # weight [2, R, in]
    b: SlotLinear  # weight [2, out, R], scale [2]


class SlotBank:
    """Owns the two slots of every LoRA module and which version each slot holds."""

    def __init__(
        self, model: nn.Module, layout: Layout, device: torch.device, dtype: torch.dtype, rows: int = 1
    ) -> None:
        self.layout = layout
        self.slot = torch.zeros(rows, dtype=torch.long, device=device)  # per batch row, written before each forward
        self._live = 0
        self._pins = [0, 0]  # rows running on each slot
        self._unpinned = threading.Condition()
        # None = unknown/dirty (a staging was interrupted): never flip to it without re-staging.
        self.contents: list[AdapterVersion | None] = [BASE_VERSION, BASE_VERSION]
        self._modules: dict[str, _ModuleSlots] = {}
        rank = layout.target_rank
        for name, module in model.named_modules():
            if not isinstance(module, LoraLinear):
                continue
            key = _layout_name(name)
            spec = layout.modules.get(key)
            if spec is None:
                raise RuntimeError(f"PEFT injected LoRA into {key!r}, which is not in the layout")
            a = SlotLinear(torch.zeros(2, rank, spec.in_features, device=device, dtype=dtype), self.slot)
            b = SlotLinear(
                torch.zeros(2, spec.out_features, rank, device=device, dtype=dtype),
                self.slot,
                torch.zeros(2, device=device, dtype=torch.float32),
            )
            module.lora_A[ADAPTER_NAME] = a
            module.lora_B[ADAPTER_NAME] = b
            # The slot's own scale does the scaling; PEFT's tensor scaling stays exactly 1.
            module.scaling[ADAPTER_NAME] = torch.ones((), device=device)
            self._modules[key] = _ModuleSlots(a, b)
        missing = set(layout.modules) - set(self._modules)
        if missing:
            raise RuntimeError(f"layout modules without a LoRA layer: {sorted(missing)[:5]}")

    @property
    def live(self) -> int:
        return self._live

    @property
    def standby(self) -> int:
        return 1 - self._live

    @property
    def live_version(self) -> AdapterVersion:
        version = self.contents[self._live]
        assert version is not None, "the live slot is never dirty"
        return version

    def assign(self, slots: list[int]) -> None:
        """Write the slot of each batch row (row ``i`` of the next forward uses ``slots[i]``). Worker only."""
        self.slot[: len(slots)].copy_(torch.tensor(slots, dtype=torch.long), non_blocking=True)

    def flip(self) -> None:
        """Commit: new rows get the standby slot from now on; running rows keep theirs. Caller guarantees
        standby holds a complete version."""
        if self.contents[self.standby] is None:
            raise RuntimeError("refusing to flip to a standby slot whose content is unknown")
        self._live = self.standby

    # ---- pinning: a slot that running rows use is never staged into -------------------------------------
    def pin(self, index: int) -> AdapterVersion:
        """A row starts on slot ``index``; returns the version it will run on, to its last token."""
        version = self.contents[index]
        if version is None:
            raise RuntimeError(f"slot {index} is being staged; no row may start on it")
        with self._unpinned:
            self._pins[index] += 1
        return version

    def unpin(self, index: int) -> None:
        with self._unpinned:
            self._pins[index] -= 1
            if self._pins[index] == 0:
                self._unpinned.notify_all()

    def pinned(self, index: int) -> int:
        """Rows running on slot ``index``."""
        return self._pins[index]

    def wait_unpinned(self, index: int, timeout: float) -> bool:
        """Block until no row runs on slot ``index`` (at most ``timeout`` seconds); whether it is free."""
        deadline = time.monotonic() + timeout
        with self._unpinned:
            while self._pins[index] > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._unpinned.wait(left)
        return True

    @torch.no_grad()
    def stage(
        self,
        index: int,
        version: AdapterVersion,
        weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scalings: Mapping[str, float],
    ) -> None:
        """Copy an adapter into slot ``index`` (never the live one). Modules it does not target are zeroed.

        The slot is marked dirty first, so an exception half-way leaves it flagged, never flipped to.
        """
        if index == self._live:
            raise RuntimeError("refusing to stage into the live slot")
        if self._pins[index]:
            raise RuntimeError(f"refusing to stage into slot {index}: {self._pins[index]} running rows use it")
        self.contents[index] = None
        # One multi-tensor copy and one multi-tensor zero for the whole adapter (torch.optim's foreach
        # ops): a 28-layer model has 196 modules, and four operations each were ~800 dispatches from the
        # swap's thread, holding the interpreter in between. The copy still moves tensor by tensor inside
        # the op (host -> device and sliced destinations take foreach's per-tensor path); the zeroing is
        # one kernel on CUDA.
        into: list[torch.Tensor] = []
        copied: list[torch.Tensor] = []
        zeroed: list[torch.Tensor] = []
        for name, slots in self._modules.items():
            a_w, b_w, scale = slots.a.weight[index], slots.b.weight[index], slots.b.scale
            assert scale is not None
            if name in weights:
                a, b = weights[name]  # a: [r, in], b: [out, r]
                r = a.shape[0]
                into += (a_w[:r], b_w[:, :r])
                copied += (a, b)
                if r < a_w.shape[0]:
                    zeroed += (a_w[r:], b_w[:, r:])
                scale[index] = scalings[name]
            else:
                zeroed += (a_w, b_w)
                scale[index] = 0.0
        if into:
            torch._foreach_copy_(into, copied, non_blocking=True)
        if zeroed:
            torch._foreach_zero_(zeroed)
        if self.slot.device.type == "cuda":
            torch.cuda.synchronize(self.slot.device)  # the copies above are async; finish before marking clean
        self.contents[index] = version

    def slot_tensors(self, index: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Views of slot ``index`` (A, B, scale) per module; for tests and diagnostics."""
        out = {}
        for name, s in self._modules.items():
            assert s.b.scale is not None
            out[name] = (s.a.weight[index], s.b.weight[index], s.b.scale[index])
        return out


def _layout_name(peft_module_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> 'model.layers.0.self_attn.q_proj'."""
    prefix = "base_model.model."
    return peft_module_name[len(prefix) :] if peft_module_name.startswith(prefix) else peft_module_name
