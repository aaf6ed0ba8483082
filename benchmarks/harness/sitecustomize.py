"""Optional server-side instrumentation for benchmark runs; never part of tidings itself.

``run.py --gc-stats`` (and ``--gc-threshold``/``--gc-freeze``) put this directory on the
server's PYTHONPATH. Python imports ``sitecustomize`` at startup, so the server runs unchanged
with, depending on environment variables:

- ``BENCH_GC_STATS=<file>``: time spent in the cyclic garbage collector, per generation, written
  to <file> as JSON every 0.25 s (cumulative: the runner takes differences over its window).
- ``BENCH_GC_THRESHOLD=a,b,c``: ``gc.set_threshold(a, b, c)`` (an experiment, not a setting).
- ``BENCH_GC_FREEZE=<seconds>``: ``gc.freeze()`` once, that long after startup (moves everything
  alive then, e.g. the subscribers' objects, to the permanent generation, as a server could after
  warm-up).
"""

import gc
import json
import os
import threading
import time

_stats_path = os.environ.get("BENCH_GC_STATS")
_threshold = os.environ.get("BENCH_GC_THRESHOLD")
_freeze = os.environ.get("BENCH_GC_FREEZE")

if _threshold:
    gc.set_threshold(*(int(x) for x in _threshold.split(",")))

if _stats_path:
    _seconds = [0.0, 0.0, 0.0]
    _counts = [0, 0, 0]
    _longest = [0.0, 0.0, 0.0]
    _pauses: list = []  # [unix time, generation, ms, collected] of collections over 2 ms
    _started = [0.0]

    def _on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        else:
            g = info["generation"]
            took = time.perf_counter() - _started[0]
            _seconds[g] += took
            _counts[g] += 1
            _longest[g] = max(_longest[g], took)
            if took > 0.002:
                _pauses.append([time.time(), g, round(took * 1000, 2), info["collected"]])
                del _pauses[:-200]

    gc.callbacks.append(_on_gc)

    def _dump() -> None:
        while True:
            time.sleep(0.25)
            tmp = _stats_path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(
                    {
                        "seconds": _seconds,
                        "collections": _counts,
                        "longest": _longest,
                        "pauses": _pauses,
                        "threshold": gc.get_threshold(),
                    },
                    fh,
                )
            os.replace(tmp, _stats_path)

    threading.Thread(target=_dump, name="bench-gc-stats", daemon=True).start()

if _freeze:

    def _freezer(after: float) -> None:
        time.sleep(after)
        gc.freeze()

    threading.Thread(
        target=_freezer, args=(float(_freeze),), name="bench-gc-freeze", daemon=True
    ).start()
