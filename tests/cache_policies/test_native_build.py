"""LoadOnce: the native libraries' load-once-per-process holder."""

from __future__ import annotations

import threading
import time

from moe_serve.cache_policies.native_build import LoadOnce


def test_concurrent_first_calls_load_once_and_share_the_result() -> None:
    calls: list[int] = []

    def load() -> object:
        calls.append(1)
        time.sleep(0.05)  # the other threads arrive while this one loads
        return object()

    holder = LoadOnce(load)
    results: list[object | None] = []
    threads = [threading.Thread(target=lambda: results.append(holder.get())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(result is results[0] is not None for result in results)


def test_an_unavailable_library_is_not_loaded_again() -> None:
    calls: list[int] = []
    holder: LoadOnce[object] = LoadOnce(lambda: calls.append(1))
    assert holder.get() is None and holder.get() is None
    assert calls == [1]
