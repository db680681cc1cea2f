"""What the HTTP handlers read from the daemon: one object, shared, its ``config`` replaced on reload."""

from __future__ import annotations

from dataclasses import dataclass

from hotswap_core.config import ServerConfig


@dataclass
class ServingState:
    """The server section of the config, readiness, and the model's name (set once the model is loaded)."""

    config: ServerConfig
    ready: bool = False
    draining: bool = False
    model_id: str = ""  # what clients pass as "model": the base's declared id, else its folder or Hub id
