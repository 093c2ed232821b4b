"""The garbage collector, told what a long-running service process keeps for its life."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Young objects are collected once this many more have been made than freed (Python's
# default is 700). A request in flight holds a few thousand (its scope, body, models,
# rows, futures): at 700 every collection scans the requests in flight and promotes them to
# be scanned again, when a few more milliseconds would have freed them by reference count.
GC_YOUNG_THRESHOLD = 20_000
_depth = 0
_threshold = gc.get_threshold()


@contextmanager
def settled_heap() -> Iterator[None]:
    """Once a service has started: what it imported and built is kept for its whole life,
    so it leaves the garbage collector's view (gc.freeze). Without this every full collection
    scans those 100,000-odd objects, 40 to 300 ms here with every request in flight waiting
    (one a replica every 15 s under load): the tail of the latency. Collections of young
    objects are also made rarer (GC_YOUNG_THRESHOLD). Cycles of garbage are still found in
    what is made from then on; on the way out (an app stopped in a process that goes on, as
    tests do) the frozen objects are handed back to the collector and the threshold restored."""
    global _depth, _threshold
    if _depth == 0:  # the first of several (apps of one process, in any order) settles it
        _threshold = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *_threshold[1:])
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:  # the last one hands it back
            gc.set_threshold(*_threshold)
            gc.unfreeze()
