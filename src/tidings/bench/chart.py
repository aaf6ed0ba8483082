"""The PNG: publish-to-delivery latency as a CDF per transport, and delivered events/s per
transport with one channel and with N channels. matplotlib's Agg backend: no display needed.

Importing this module raises ImportError without matplotlib (``pip install 'tidings[bench]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from .report import NAMES, per_s


def render(document: dict[str, Any], path: Path) -> None:
    matplotlib.use("Agg")  # before pyplot: no display, whatever the environment says
    import matplotlib.pyplot as plt

    ran = [(t, r) for t, r in document["transports"].items() if r.get("status") == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    params = document["parameters"]
    machine = document["machine"]
    fig.suptitle(
        f"tidings bench: {params['subscribers']} subscribers, {params['rate_events_per_s']:g} "
        f"events/s, {params['payload_bytes']}-byte events - {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['python']}",
        fontsize=10,
    )

    for t, r in ran:
        cdf = r["paced"]["latency"].get("cdf_ms") or []
        if cdf:
            fractions = [i / (len(cdf) - 1) for i in range(len(cdf))]
            left.step([max(v, 1e-3) for v in cdf], fractions, where="post", label=NAMES.get(t, t))
    left.set_xscale("log")
    left.set_xlabel("publish-to-delivery latency, ms (log)")
    left.set_ylabel("fraction of deliveries")
    left.set_title("Latency (paced phase)", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    if ran:
        left.legend(fontsize=8)

    names = [NAMES.get(t, t) for t, _ in ran]
    one = [r["throughput_one_channel"]["deliveries_per_s"] or 0 for _, r in ran]
    many = [r["throughput_n_channels"]["deliveries_per_s"] or 0 for _, r in ran]
    xs = range(len(ran))
    right.bar([x - 0.2 for x in xs], one, width=0.4, label="N subscribers, 1 channel")
    right.bar([x + 0.2 for x in xs], many, width=0.4, label="N subscribers, N channels")
    right.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    for x, value in [(x - 0.2, v) for x, v in zip(xs, one, strict=True)] + [
        (x + 0.2, v) for x, v in zip(xs, many, strict=True)
    ]:
        if value:
            right.annotate(per_s(value), (x, value), ha="center", va="bottom", fontsize=7)
    values = [v for v in one + many if v]
    if values:
        right.set_yscale("log")
        right.set_ylim(min(values) / 3, max(values) * 3)  # bars start well below the lowest
    right.set_ylabel("delivered events/s (log)")
    right.set_title("Throughput (closed loop)", fontsize=10)
    right.grid(True, axis="y", which="both", alpha=0.3)
    right.legend(fontsize=8)

    fig.savefig(path, dpi=110)
    plt.close(fig)
