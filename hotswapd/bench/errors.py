"""The bench's one error: a contender could not be measured (a swap failed, a daemon did not start)."""

from hotswap_core.errors import HotswapError


class BenchError(HotswapError):
    """A measurement could not be taken; the message says which and why."""
