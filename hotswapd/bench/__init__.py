"""``hotswapd bench``: hotswapd measured against the alternatives in one run (see ``runner``).

``runner`` orders the comparisons and builds the figures; ``inprocess`` holds the contenders that share
this process (hotswapd's engine and swapper, PEFT's compiled models); ``daemon`` the ones that need a
real ``hotswapd run``; ``adapters`` writes the adapters they swap; ``stats`` and ``report`` turn
samples into medians, p99s, ratios, targets and the printed table.
"""
