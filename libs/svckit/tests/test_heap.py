"""svckit.heap.settled_heap: what was built before start leaves the collector's view while
the service runs, new garbage cycles are still collected, and all is handed back on exit."""

from __future__ import annotations

import gc
import weakref

from fastapi.testclient import TestClient

from svckit.app import base_app
from svckit.heap import GC_YOUNG_THRESHOLD, settled_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_frozen_while_running_cycles_still_collected_all_handed_back() -> None:
    before = gc.get_threshold()
    with settled_heap():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        garbage = cycle()  # made while running: the collector still finds it
        assert garbage() is not None
        gc.collect()
        assert garbage() is None
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_a_frozen_cycle_is_collected_once_handed_back() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    garbage = weakref.ref(a)
    with settled_heap():  # reachable at the start: frozen
        del a, b  # garbage now, but out of the collector's view while the service runs
        gc.collect()
        assert garbage() is not None
    gc.collect()
    assert garbage() is None


def test_every_service_app_settles_its_heap_after_its_lifespan_starts() -> None:
    seen: dict[str, int] = {}
    app = base_app("heap-test", log_level="WARNING")

    @app.get("/frozen")
    async def frozen() -> dict[str, int]:
        seen["count"] = gc.get_freeze_count()
        return {"threshold": gc.get_threshold()[0]}

    with TestClient(app) as client:
        assert client.get("/frozen").json() == {"threshold": GC_YOUNG_THRESHOLD}
    assert seen["count"] > 0
    assert gc.get_freeze_count() == 0
