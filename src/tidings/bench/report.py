"""The results as the seed's comparison table: the measured value beside each qualitative word.

The seed (docs: "Real-Time Notification Architectures", its comparison table) rates latency,
bandwidth use and scalability with words; ``SEED`` holds them, ``rows`` puts the measured
figures beside them, ``text`` and ``markdown`` render the same rows. Pure: dicts in, str out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

NAMES = {
    "ws": "WebSocket",
    "sse": "SSE",
    "longpoll": "Long polling",
    "poll": "Short polling",
    "grpc": "gRPC",
    "webhooks": "Webhooks",
    "mqtt": "MQTT relay",
    "amqp": "AMQP relay",
}
# The seed's words, by row and transport. gRPC and AMQP are not in its table; both polling
# kinds are its "HTTP Polling".
SEED: dict[str, dict[str, str]] = {
    "Latency": {
        "webhooks": "Moderate",
        "ws": "Very Low",
        "longpoll": "Moderate",
        "poll": "Moderate",
        "sse": "Low",
        "mqtt": "Moderate",
    },
    "Bandwidth use": {
        "webhooks": "Depends on payload",
        "ws": "Moderate",
        "longpoll": "High",
        "poll": "High",
        "sse": "Low",
        "mqtt": "Very Low",
    },
    "Scalability": {
        "webhooks": "Moderate",
        "ws": "High",
        "longpoll": "Low",
        "poll": "Low",
        "sse": "Moderate",
        "mqtt": "High",
    },
}
ROWS = (
    "Latency",
    "Bandwidth use",
    "Scalability",
    "Server CPU per 1,000 deliveries",
    "Server memory per idle subscriber",
    "Losses / duplicates",
    "Generator CPU (peak)",
)
NO_WORD = "—"


def ms(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value >= 100:
        return f"{value:,.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def per_s(value: float | None) -> str:
    """A rate, short: 950/s, 12.3k/s, 412k/s, 1.23M/s."""
    if value is None:
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M/s"
    if value >= 1e5:
        return f"{value / 1e3:.0f}k/s"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k/s"
    return f"{value:.0f}/s"


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    if nbytes >= 10_000:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes:,.0f} B"


def kib(kb: float | None) -> str:
    return "n/a" if kb is None else f"{kb:.1f} KiB"


def column_name(transport: str, result: dict[str, Any]) -> str:
    name = NAMES.get(transport, transport)
    interval = result.get("params", {}).get("poll_interval")
    if transport == "poll" and interval is not None:
        name += f" ({interval:g} s)"
    return name


def cells(transport: str, r: dict[str, Any]) -> dict[str, list[str]]:
    """Each row's cell for one transport: the seed's word first, then the figures."""
    paced = r.get("paced", {})
    lat = paced.get("latency", {})
    one = r.get("throughput_one_channel", {})
    many = r.get("throughput_n_channels", {})
    memory = r.get("memory", {})
    cpu = one.get("server_cpu_s_per_1000_deliveries")
    mem = kib(memory.get("kb_per_idle_subscriber"))
    if memory.get("held_by") == "broker" and memory.get("kb_per_idle_subscriber") is not None:
        mem = f"{mem} (hub)"
        if memory.get("broker_kb_per_idle_subscriber") is not None:
            mem += f"; broker {kib(memory['broker_kb_per_idle_subscriber'])}"
    generator = [
        phase.get("generator_cpu_util")
        for phase in (paced, one, many)
        if phase.get("generator_cpu_util") is not None
    ]
    resumed = paced.get("dropped_and_resumed", 0)
    return {
        "Latency": [f"p50 {ms(lat.get('p50_ms'))}", f"p99 {ms(lat.get('p99_ms'))}"],
        "Bandwidth use": [f"{size(paced.get('bytes_per_delivery'))}/event"],
        "Scalability": [
            f"1 ch: {per_s(one.get('deliveries_per_s'))}",
            f"N ch: {per_s(many.get('deliveries_per_s'))}",
        ],
        "Server CPU per 1,000 deliveries": ["n/a" if cpu is None else f"{cpu * 1e3:.2f} ms"],
        "Server memory per idle subscriber": [mem],
        "Losses / duplicates": [
            f"{paced.get('losses', 'n/a')} / {paced.get('duplicates', 'n/a')}",
            f"({resumed} resumed)",
        ],
        "Generator CPU (peak)": [f"{max(generator):.0%}" if generator else "n/a"],
    }


def rows(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[tuple[str, list[list[str]]]]]:
    """(column names, [(row name, [cell lines per column])]) for the transports that ran."""
    ran = [(t, r) for t, r in results.items() if r.get("status") == "ok"]
    columns = [column_name(t, r) for t, r in ran]
    table = []
    per_transport = [(t, cells(t, r)) for t, r in ran]
    for row in ROWS:
        line = []
        for t, c in per_transport:
            figures = c[row]
            if row in SEED:
                figures = [SEED[row].get(t, NO_WORD), *figures]
            line.append(figures)
        table.append((row, line))
    return columns, table


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The table in Markdown: a cell is the seed's word, an em dash, then the figures."""
    columns, table = rows(results)
    if not columns:
        return "(no transport ran)"
    out = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, line in table:
        rendered = []
        for figures in line:
            if name in SEED:
                word, rest = figures[0], " / ".join(figures[1:])
                rendered.append(rest if word == NO_WORD else f"{word} — {rest}")
            else:
                rendered.append(" ".join(figures))
        out.append(f"| **{name}** | " + " | ".join(rendered) + " |")
    return "\n".join(out)


def _grid(columns: Sequence[str], table: Sequence[tuple[str, list[list[str]]]]) -> list[str]:
    label = max(len(name) for name, _ in table)
    widths = [
        max(len(c), *(len(s) for _, line in table for s in line[i])) for i, c in enumerate(columns)
    ]
    rule = "+" + "+".join("-" * (w + 2) for w in [label, *widths]) + "+"

    def line(parts: Iterable[str]) -> str:
        return (
            "| "
            + " | ".join(p.ljust(w) for p, w in zip(parts, [label, *widths], strict=True))
            + " |"
        )

    out = [rule, line(["", *columns]), rule]
    for name, cellset in table:
        height = max(len(c) for c in cellset)
        for k in range(height):
            out.append(
                line([name if k == 0 else "", *(c[k] if k < len(c) else "" for c in cellset)])
            )
        out.append(rule)
    return out


def text(results: dict[str, dict[str, Any]], width: int = 120) -> str:
    """The table for a terminal, one cell per box, split into several tables when the
    transports do not fit in ``width`` columns."""
    columns, table = rows(results)
    if not columns:
        return "(no transport ran)"
    groups: list[list[int]] = [[]]
    for i in range(len(columns)):
        trial = groups[-1] + [i]
        grid = _grid([columns[j] for j in trial], [(n, [c[j] for j in trial]) for n, c in table])
        if groups[-1] and len(grid[0]) > width:
            groups.append([i])
        else:
            groups[-1] = trial
    blocks = []
    for group in groups:
        sub = [(n, [c[j] for j in group]) for n, c in table]
        blocks.append("\n".join(_grid([columns[j] for j in group], sub)))
    return "\n\n".join(blocks)


def skipped(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per transport that did not run, with why."""
    out = []
    for t, r in results.items():
        if r.get("status") == "skipped":
            out.append(f"skipped {NAMES.get(t, t)}: {r.get('reason', '')}")
        elif r.get("status") == "failed":
            out.append(f"FAILED {NAMES.get(t, t)}: {r.get('error', '')}")
    return out


def legend(params: dict[str, Any]) -> str:
    """What the rows measure, under the table (docs/benchmarks.md has the method)."""
    n, rate = params["subscribers"], params["rate_events_per_s"]
    return (
        f"Words: the seed's comparison table. Figures: {n} subscribers, {params['payload_bytes']}"
        f"-byte events. Latency: publish to delivery at {rate:g} events/s on one channel "
        "(subscribers never dropped). Bandwidth: bytes on the wire at the subscribers' sockets, "
        "both directions, handshakes and polls included, per delivered event. Scalability: "
        f"delivered events/s, closed loop, {n} subscribers on 1 channel / on {n} channels. "
        "CPU: the hub's, per 1,000 deliveries on 1 channel. Memory: hub RSS growth per idle "
        "subscriber. Losses / duplicates: after 10 % were dropped and resumed from their cursor. "
        "Generator CPU below 100 %: the load generator was not the limit."
    )


def noisy(results: dict[str, dict[str, Any]], limit: float = 0.25) -> list[str]:
    """A warning per transport whose throughput phases shared the machine with other work."""
    out = []
    for t, r in results.items():
        if r.get("status") != "ok":
            continue
        other = max(
            r[phase].get("other_cpu_util") or 0.0
            for phase in ("throughput_one_channel", "throughput_n_channels")
        )
        if other > limit:
            out.append(
                f"note: {NAMES.get(t, t)}: other work used {other:.0%} of a core during its "
                "throughput phases (kernel, other processes): its figures are noisy; rerun on "
                "a quiet machine"
            )
    return out
