"""hotswapd's library: engine, adapters, swap, sources, history, metrics, config (no process concerns)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hotswapd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
