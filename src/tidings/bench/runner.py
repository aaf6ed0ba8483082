"""``tidings bench``'s controller: for each transport, a fresh hub (or the one at ``--url``) and
a load generator process; then the table, the JSON and the chart.

The controller itself does no I/O on the hot path: it starts processes, relays the
generator's progress to the bar, and collects what each generator reports.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import report
from .driver import TRANSPORTS, Target
from .hub import (
    WEBHOOKS_TO_LOOPBACK,
    Hub,
    LocalHub,
    RemoteHub,
    Unreachable,
    answers,
    split_url,
)
from .proc import machine, placement
from .progress import ProgressBar
from .workload import Params, plan

DEFAULT_MQTT = "mqtt://127.0.0.1:1883"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
HUB_START_S = 1.5


@dataclass
class Options:
    subscribers: int = 200
    rate: float = 10.0
    payload: int = 256
    duration: float = 4.0
    transports: list[str] = field(default_factory=list)  # empty: every available one
    poll_interval: float = 1.0
    out: str = "tidings-bench"
    url: str = ""
    pid: int | None = None
    grpc_port: int = 0
    mqtt: str = ""
    amqp: str = ""
    json: str = ""
    png: str = ""
    width: int = 0  # the table's width (0: the terminal's)

    @property
    def json_path(self) -> Path:
        return Path(self.json) if self.json else Path(self.out) / "bench.json"

    @property
    def png_path(self) -> Path:
        return Path(self.png) if self.png else Path(self.out) / "bench.png"

    @property
    def markdown_path(self) -> Path:
        return Path(self.out) / "bench.md"


def broker_answers(url: str, default_port: int) -> bool:
    host, port = split_url(url, default_port)
    return answers(host, port, 1.0)


def choose(options: Options) -> list[tuple[str, str]]:
    """(transport, why it is skipped or "") in run order.

    MQTT and AMQP run when their broker answers: at ``--mqtt``/``--amqp`` if given, else at
    the default local address; without a broker they are skipped with the reason. Against
    ``--url``, a relay runs only if that hub has it.
    """
    wanted = options.transports or list(TRANSPORTS)
    out = []
    for t in wanted:
        reason = ""
        if t == "mqtt":
            url = options.mqtt or DEFAULT_MQTT
            if not options.url and not broker_answers(url, 1883):
                reason = f"no MQTT broker answers at {url} (start one, or pass --mqtt URL)"
        elif t == "amqp":
            url = options.amqp or DEFAULT_AMQP
            if not options.url and not broker_answers(url, 5672):
                reason = f"no AMQP broker answers at {url.split('@')[-1]} (--amqp URL)"
        out.append((t, reason))
    return out


def remote_reason(hub: Hub, transport: str) -> str:
    """Why a transport cannot run against a hub someone else started ("" if it can)."""
    if transport == "grpc" and not answers(hub.host, hub.grpc_port, 1.0):
        return f"nothing answers gRPC at {hub.host}:{hub.grpc_port} (--grpc-port)"
    if transport in ("mqtt", "amqp"):
        relays = hub.health().get("relays", {})
        if not relays.get(transport, {}).get("connected"):
            return f"the hub has no connected {transport.upper()} relay"
    return ""


def start_hub(options: Options, transport: str, cores: list[int]) -> LocalHub:
    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    if transport == "webhooks":
        env.update(WEBHOOKS_TO_LOOPBACK)
        env["TIDINGS_WEBHOOKS_MAX_ENDPOINTS"] = str(max(1000, options.subscribers))
    elif transport == "mqtt":
        args = ("--mqtt", options.mqtt or DEFAULT_MQTT)
    elif transport == "amqp":
        args = ("--amqp", options.amqp or DEFAULT_AMQP)
    return LocalHub(cores, args, env).start()


def params_for(options: Options, transport: str, pid: int | None) -> Params:
    return Params(
        transport=transport,
        subscribers=options.subscribers,
        rate=options.rate,
        payload=options.payload,
        duration=options.duration,
        poll_interval=options.poll_interval,
        pid=pid,
    )


def expected_seconds(options: Options, transport: str) -> float:
    return HUB_START_S + sum(s for _, s in plan(params_for(options, transport, None)))


def run_loadgen(
    spec: dict[str, Any], on_progress: Any, timeout: float
) -> tuple[str, dict[str, Any]]:
    """Run one generator process; ("result"|"skip"|"error", what it said)."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidings.bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(orjson.dumps(spec) + b"\n")
        proc.stdin.close()
        deadline = time.monotonic() + timeout
        final: tuple[str, dict[str, Any]] | None = None
        try:
            for raw in proc.stdout:
                line = orjson.loads(raw)
                if "progress" in line:
                    on_progress(line["progress"], line.get("phase", ""))
                elif "result" in line:
                    final = ("result", line["result"])
                elif "skip" in line:
                    final = ("skip", {"reason": line["skip"]})
                elif "error" in line:
                    final = ("error", line)
                if time.monotonic() > deadline:
                    proc.kill()
                    final = ("error", {"error": f"the load generator took over {timeout:.0f} s"})
                    break
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if final is None:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-5:]
            final = (
                "error",
                {"error": f"the load generator exited with {proc.returncode}: " + " | ".join(tail)},
            )
        return final


def totals(results: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Losses and duplicates over every transport and phase."""
    losses = duplicates = 0
    for r in results.values():
        if r.get("status") != "ok":
            continue
        paced = r["paced"]
        losses += paced["losses"] + paced["unexpected"]
        duplicates += paced["duplicates"]
        for key in ("throughput_one_channel", "throughput_n_channels"):
            losses += r[key]["missing"]
            duplicates += r[key]["extra"]
    return {"losses": losses, "duplicates": duplicates}


def run(options: Options, argv: list[str]) -> int:
    started = time.time()
    bar = ProgressBar()
    server_cores, generator_cores = placement()
    remote: Hub | None = None
    if options.url:
        try:
            remote = RemoteHub.attach(options.url, options.grpc_port, options.pid)
        except Unreachable as exc:
            print(f"tidings: {exc}", file=sys.stderr)
            return 1
        server_cores, generator_cores = [], []
    chosen = choose(options)
    run_id = uuid.uuid4().hex[:8]
    weights = {t: expected_seconds(options, t) for t, why in chosen if not why}
    total_weight = sum(weights.values()) or 1.0
    done_weight = 0.0
    results: dict[str, dict[str, Any]] = {}
    running = [t for t, why in chosen if not why]
    for transport, why in chosen:
        if why:
            results[transport] = {"status": "skipped", "reason": why}
            bar.note(f"tidings bench: skipping {transport}: {why}")
            continue
        step = f"{running.index(transport) + 1}/{len(running)}"
        name = f"{report.NAMES.get(transport, transport)} ({step})"
        bar.update(done_weight / total_weight, f"{name}: starting the hub")
        hub: Hub
        try:
            hub = remote or start_hub(options, transport, server_cores)
        except RuntimeError as exc:
            results[transport] = {"status": "failed", "error": str(exc).splitlines()[0]}
            bar.note(f"tidings bench: {name}: {exc}")
            done_weight += weights[transport]
            continue
        try:
            if remote is not None and (why := remote_reason(remote, transport)):
                results[transport] = {"status": "skipped", "reason": why}
                bar.note(f"tidings bench: skipping {transport}: {why}")
                continue
            target = Target(
                host=hub.host,
                port=hub.port,
                grpc_port=hub.grpc_port,
                mqtt_url=options.mqtt or DEFAULT_MQTT,
                amqp_url=options.amqp or DEFAULT_AMQP,
                run_id=run_id,
                poll_interval=options.poll_interval,
            )
            params = params_for(options, transport, hub.pid)
            spec = {"target": asdict(target), "params": asdict(params), "cores": generator_cores}
            offset, weight = done_weight, weights[transport]

            def progress(
                f: float, phase: str, offset: float = offset, w: float = weight, name: str = name
            ) -> None:
                bar.update(
                    (offset + HUB_START_S + f * (w - HUB_START_S)) / total_weight,
                    f"{name}: {phase}",
                )

            kind, said = run_loadgen(spec, progress, timeout=max(120.0, 4 * weight))
            if kind == "result":
                results[transport] = {"status": "ok", **said, "params": asdict(params)}
            elif kind == "skip":
                results[transport] = {"status": "skipped", **said}
                bar.note(f"tidings bench: skipping {transport}: {said['reason']}")
            else:
                results[transport] = {"status": "failed", "error": said.get("error", "")}
                bar.note(f"tidings bench: {name} failed: {said.get('error', '')}")
                if said.get("detail"):
                    bar.note(said["detail"])
        finally:
            if remote is None:
                hub.stop()
            done_weight += weights[transport]
    bar.update(1.0, "writing the results")
    bar.clear()
    return finish(options, argv, results, started, server_cores, generator_cores)


def finish(
    options: Options,
    argv: list[str],
    results: dict[str, dict[str, Any]],
    started: float,
    server_cores: list[int],
    generator_cores: list[int],
) -> int:
    count = totals(results)
    document: dict[str, Any] = {
        "tidings_bench": 1,
        "command": " ".join(["tidings", "bench", *argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {
            **machine(),
            "hub_cores": server_cores or "unpinned",
            "generator_cores": generator_cores or "unpinned",
        },
        "parameters": {
            "subscribers": options.subscribers,
            "rate_events_per_s": options.rate,
            "payload_bytes": options.payload,
            "duration_s": options.duration,
            "poll_interval_s": options.poll_interval,
            "url": options.url or "a fresh hub per transport (SQLite, durability normal)",
            "pid": options.pid,
        },
        **count,
        "transports": results,
    }
    width = options.width or shutil.get_terminal_size((120, 24)).columns
    print(report.text(results, width))
    for line in report.skipped(results) + report.noisy(results):
        print(line)
    legend = report.legend(document["parameters"])
    print(legend)
    out = options.json_path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    options.markdown_path.parent.mkdir(parents=True, exist_ok=True)
    options.markdown_path.write_text(report.markdown(results) + "\n\n" + legend + "\n")
    written = [str(out), str(options.markdown_path)]
    png = write_chart(document, options.png_path)
    if png:
        written.append(png)
    print(
        f"losses {count['losses']}, duplicates {count['duplicates']}; wrote "
        + ", ".join(written)
        + f" in {document['elapsed_s']:.0f} s"
    )
    failed = any(r.get("status") == "failed" for r in results.values())
    ran = any(r.get("status") == "ok" for r in results.values())
    return 1 if count["losses"] or count["duplicates"] or failed or not ran else 0


def write_chart(document: dict[str, Any], path: Path) -> str:
    """The PNG, if matplotlib is installed; its path, or "" with a note on stderr."""
    try:
        from .chart import render
    except ImportError:
        print(
            "tidings bench: no chart: matplotlib is not installed (pip install 'tidings[bench]')",
            file=sys.stderr,
        )
        return ""
    path.parent.mkdir(parents=True, exist_ok=True)
    render(document, path)
    return str(path)
