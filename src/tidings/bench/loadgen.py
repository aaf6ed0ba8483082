"""The load generator's process: ``python -m tidings.bench.loadgen`` runs the workload over
one transport and reports as JSON lines on stdout.

It reads one JSON object on stdin (the transport, the hub's address, the parameters, the cores
to run on), pins itself to those cores, and writes ``{"progress": f, "phase": "…"}`` lines
while it runs, then one ``{"result": {…}}`` or ``{"error": "…"}`` line. Its own process, so the
generator's CPU is its own and it can sit on other cores than the hub; ``tidings bench``
starts one per transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import traceback
from typing import Any

import orjson

from .driver import Skip, Target, load_driver
from .proc import raise_nofile
from .stats import Meter
from .workload import Params, Workload


def emit(line: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
    sys.stdout.flush()


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    target = Target(**spec["target"])
    params = Params(**spec["params"])
    driver = load_driver(params.transport)(target, Meter())
    workload = Workload(driver, params, target.host, target.port)

    async def ticker() -> None:
        while True:
            emit(
                {
                    "progress": round(workload.progress.fraction(), 4),
                    "phase": workload.progress.label,
                }
            )
            await asyncio.sleep(0.25)

    tick = asyncio.create_task(ticker())
    try:
        return await workload.run()
    finally:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick


def main() -> int:
    spec = orjson.loads(sys.stdin.buffer.readline())
    cores = spec.get("cores") or []
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))
    raise_nofile()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on Windows
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        result = runner(run(spec))
    except Skip as exc:
        emit({"skip": str(exc)})
        return 0
    except Exception as exc:
        detail = traceback.format_exc(limit=-4) if os.environ.get("TIDINGS_BENCH_DEBUG") else ""
        emit({"error": f"{type(exc).__name__}: {exc}".strip(), "detail": detail})
        return 1
    emit({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
