"""Summarise a ``py-spy record --format raw`` profile: where the samples went, by function.

    .venv/bin/python benchmarks/pyspy_summary.py /tmp/profile.txt [--top 30] [--lines]
        [--within FUNCTION]

Prints, for the top functions, "self" (the sample's innermost Python frame, i.e. time spent in
that function itself or in C code it called) and "total" (the function is anywhere on the stack).
``--lines`` keys self time by file:line instead of by function. ``--within`` keeps only stacks
that pass through a function whose name contains the given text (e.g. ``_pump``). ``--groups``
buckets every sample by the first matching part of the server (``GROUPS``; by content, because
``--nonblocking`` samples often lack the outer frames).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

IDLE = {
    "concurrent/futures/thread.py:81 _worker",
    "threading.py:327 Condition.wait",
    "threading.py:331 Condition.wait",
}
GROUPS = [  # (bucket, substrings of a stack), first match wins
    ("SQLite writer thread (_write_sync)", ["SQLiteLog._write_sync"]),
    ("other threads", ["Thread._bootstrap"]),
    ("asyncio.timeout (enter/exit, call_at, current_task)", ["asyncio/timeouts.py"]),
    ("uvicorn response send (incl. transport.write)", ["RequestResponseCycle.send"]),
    ("uvicorn request parsing, task start", ["HttpToolsProtocol.data_received"]),
    ("commit listener + fan-out (Hub.deliver)", ["Hub.deliver", "MemoryBroker.publish"]),
    ("SQLite write loop on the event loop", ["SQLiteLog._write_loop"]),
    ("publish awaiting group commit (append, shield)", ["SQLiteLog.append", "Hub.publish"]),
    ("starlette Request construction", ["Request.__init__"]),
    ("tidings HTTP handlers (validate, draft, envelope)", ["tidings/transports/http.py"]),
    ("SSE pump (EventStream, next_batch, poll_batch)", ["EventStream", "Subscription."]),
    ("starlette/uvicorn middleware, routing, Response", ["starlette/", "uvicorn/"]),
    ("uvloop C (epoll, reads, callbacks)", ["Runner.run (asyncio/runners.py"]),
]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for raw in stack.split(";"):
        m = _FRAME.match(raw.strip())
        if m is None:
            out.append((raw.strip(), raw.strip()))
        else:
            func = f"{m['func']} ({m['file']})"
            out.append((func, f"{m['file']}:{m['line']} {m['func']}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--lines", action="store_true")
    p.add_argument("--within", default="")
    p.add_argument("--groups", action="store_true", help="bucket samples by server part")
    p.add_argument(
        "--keep-idle",
        action="store_true",
        help="keep samples of idle pool threads (py-spy sometimes reports a thread "
        "blocked in queue.get as active)",
    )
    args = p.parse_args()
    selfs: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    py_self: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    native: Counter[str] = Counter()
    total = 0
    for line in Path(args.profile).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        fs = frames(stack)
        if not args.keep_idle and any(
            line in IDLE or "SimpleQueue_get" in func for func, line in fs
        ):
            continue
        if args.within and not any(args.within in f for f, _ in fs):
            continue
        total += n
        bucket = next((g for g, keys in GROUPS if any(k in stack for k in keys)), "other")
        groups[bucket] += n
        leaf = fs[-1][1] if args.lines else fs[-1][0]
        selfs[leaf] += n
        # With --native the innermost frame is often C; also charge the innermost Python frame,
        # and the native leaf on its own (syscalls, the garbage collector...).
        py = [f for f in fs if ".py" in f[1]]
        if py:
            py_self[py[-1][1] if args.lines else py[-1][0]] += n
        if ".py" not in fs[-1][1]:
            native[fs[-1][0].split(" (")[0]] += n
        for func in {f for f, _ in fs}:
            totals[func] += n
    if not total:
        print("no samples")
        return
    print(f"{total} samples" + (f" through {args.within!r}" if args.within else ""))
    if args.groups:
        print(f"\n{'share':>7}  {'n':>6}  part of the server")
        for name, n in groups.most_common():
            print(f"{100 * n / total:6.1f}%  {n:6d}  {name}")
        return
    print(f"\n{'self %':>7}  {'self':>6}  innermost frame")
    for name, n in selfs.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {n:6d}  {name}")
    if native:
        print(f"\n{'self %':>7}  {'self':>6}  innermost Python frame (native frames folded in)")
        for name, n in py_self.most_common(args.top):
            print(f"{100 * n / total:6.1f}%  {n:6d}  {name}")
        print(f"\n{'self %':>7}  {'self':>6}  native leaf (syscall wrappers, gc, ...)")
        for name, n in native.most_common(args.top):
            print(f"{100 * n / total:6.1f}%  {n:6d}  {name}")
    print(f"\n{'total %':>7}  {'total':>6}  on the stack")
    for name, n in totals.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {n:6d}  {name}")


if __name__ == "__main__":
    main()
