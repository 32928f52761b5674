"""Cluster store benchmark: the SQLite and etcd backends under concurrent processes.

    .venv/bin/python bench/cluster_store.py [--processes 8] [--ids 500] [--cycles 200] [--events 100]

Per backend: every process allocates client IDs for its own guests; then runs cycles of reserve
(exclusive, on one of a few shared LUs, so they collide), read the LU's reservations, release; then
publishes events while a subscriber measures the delivery lag (publish call to delivery).
Correctness is checked, not assumed: duplicate IDs, a second holder seen while holding or
overlapping hold intervals of one LU, events lost, repeated or out of order must all be 0.
etcd is started from scripts/etcd.sh on free 127.0.0.1 ports and stopped by its PID.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from orchestrator.cluster import EXCLUSIVE, LIFECYCLE, Event, EventFilter, open_store
from orchestrator.errors import ConflictError

ETCD_SH = Path(__file__).resolve().parent.parent / "scripts" / "etcd.sh"
SHARED_LUS = 16
START_DELAY = 0.5  # every process waits for the same instant, so that they really run at once
# fork: workers are functions of this script, which a spawned child could not import by name.
PROCESSES = multiprocessing.get_context("fork")

Metrics = dict[str, float | int]  # ints are counts


def wait_until(instant: float) -> None:
    time.sleep(max(0.0, instant - time.monotonic()))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else 0.0


def allocate_ids(url: str, worker: int, count: int, start: float) -> tuple[list[float], list[int], float]:
    with open_store(url, timeout=30) as store:
        wait_until(start)
        latencies, ids = [], []
        for i in range(count):
            began = time.monotonic()
            ids.append(store.allocate_client_id(f"bench-{worker}-{i}"))
            latencies.append(time.monotonic() - began)
        return latencies, ids, time.monotonic()


def reserve_cycles(
    url: str, worker: int, count: int, start: float
) -> tuple[list[float], list[tuple[str, float, float]], int, int, float]:
    """Cycles of reserve, read the LU's reservations while holding it, release."""
    with open_store(url, timeout=30) as store:
        node = store.register_node(f"bench-{worker}", f"127.0.0.1:{20000 + worker}", 120).node.id
        wait_until(start)
        latencies, holds, conflicts, intruders = [], [], 0, 0
        for i in range(count):
            lu = f"lu-{(worker + i) % SHARED_LUS}"
            began = time.monotonic()
            try:
                store.reserve(lu, node, f"guest-{worker}", EXCLUSIVE)
            except ConflictError:
                conflicts += 1
                latencies.append(time.monotonic() - began)
                continue
            held = time.monotonic()
            intruders += sum(r.node != node for r in store.reservations(lu))
            released = time.monotonic()
            store.release(lu, node)
            latencies.append(time.monotonic() - began)
            holds.append((lu, held, released))
        end = time.monotonic()
        store.deregister_node(node)
        return latencies, holds, conflicts, intruders, end


def publish_events(url: str, worker: int, count: int, start: float) -> tuple[list[float], float]:
    with open_store(url, timeout=30) as store:
        wait_until(start)
        latencies = []
        for i in range(count):
            began = time.monotonic()
            store.publish(Event(LIFECYCLE, "created", f"lu/ev-{worker}-{i}", {"i": i}))
            latencies.append(time.monotonic() - began)
        return latencies, time.monotonic()


def double_holds(holds: list[tuple[str, float, float]]) -> int:
    """Exclusive hold intervals of one LU that overlap: each one is a broken reservation."""
    by_lu: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for lu, held, released in holds:
        by_lu[lu].append((held, released))
    overlaps = 0
    for intervals in by_lu.values():
        intervals.sort()
        overlaps += sum(later[0] < earlier[1] for earlier, later in itertools.pairwise(intervals))
    return overlaps


def bench(url: str, processes: int, ids: int, cycles: int, events: int) -> Metrics:
    metrics: Metrics = {}
    with PROCESSES.Pool(processes) as pool:
        start = time.monotonic() + START_DELAY
        id_results = pool.starmap(allocate_ids, [(url, w, ids, start) for w in range(processes)])
        latencies = [lat for result in id_results for lat in result[0]]
        allocated = [i for result in id_results for i in result[1]]
        metrics["ID allocations/s"] = len(allocated) / (max(r[2] for r in id_results) - start)
        metrics["ID allocation p50 (ms)"] = percentile(latencies, 50) * 1000
        metrics["ID allocation p99 (ms)"] = percentile(latencies, 99) * 1000
        metrics["duplicate IDs"] = len(allocated) - len(set(allocated))

        start = time.monotonic() + START_DELAY
        cycle_results = pool.starmap(reserve_cycles, [(url, w, cycles, start) for w in range(processes)])
        latencies = [lat for result in cycle_results for lat in result[0]]
        metrics["reserve/read/release cycles/s"] = len(latencies) / (max(r[4] for r in cycle_results) - start)
        metrics["cycle p50 (ms)"] = percentile(latencies, 50) * 1000
        metrics["cycle p99 (ms)"] = percentile(latencies, 99) * 1000
        metrics["refused (LU held by another)"] = sum(r[2] for r in cycle_results)
        overlaps = double_holds([h for result in cycle_results for h in result[1]])
        metrics["double exclusive holds"] = overlaps + sum(r[3] for r in cycle_results)

        with open_store(url, timeout=30) as store:
            subscription = store.subscribe(EventFilter(obj_prefix="lu/ev-"))
            expected = processes * events
            received: list[Event] = []
            lags: list[float] = []

            def listen() -> None:
                deadline = time.monotonic() + 120
                while len(received) < expected and time.monotonic() < deadline:
                    event = subscription.get(timeout=1)
                    if event is not None:
                        lags.append(time.time() - event.time)
                        received.append(event)

            listener = threading.Thread(target=listen)
            listener.start()
            start = time.monotonic() + START_DELAY
            event_results = pool.starmap(publish_events, [(url, w, events, start) for w in range(processes)])
            listener.join()
            extra = subscription.get(timeout=0.5)
            subscription.close()
        seqs = [e.seq for e in received]
        metrics["events published/s"] = expected / (max(r[1] for r in event_results) - start)
        metrics["event delivery lag p50 (ms)"] = percentile(lags, 50) * 1000
        metrics["event delivery lag p99 (ms)"] = percentile(lags, 99) * 1000
        lost_or_repeated = abs(expected - len(set(seqs))) + (len(seqs) - len(set(seqs))) + (extra is not None)
        metrics["events lost, repeated or out of order"] = int(lost_or_repeated + (seqs != sorted(seqs)))
    return metrics


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--ids", type=int, default=500, help="client IDs allocated per process")
    parser.add_argument("--cycles", type=int, default=200, help="reserve/release cycles per process")
    parser.add_argument("--events", type=int, default=100, help="events published per process")
    args = parser.parse_args()
    sizes = (args.processes, args.ids, args.cycles, args.events)

    results: dict[str, Metrics] = {}
    with tempfile.TemporaryDirectory(prefix="osimg-bench-") as tmp:
        began = time.monotonic()
        results["sqlite"] = bench(f"sqlite://{tmp}/cluster.sqlite", *sizes)
        print(f"sqlite done in {time.monotonic() - began:.1f} s", flush=True)
        port, peer_port = free_ports(2)
        subprocess.run([ETCD_SH, "pki", f"{tmp}/pki"], check=True, capture_output=True)
        started = subprocess.run(  # with TLS and client certificates, as osimg runs it
            [ETCD_SH, "start", str(port), f"{tmp}/etcd", str(peer_port), f"{tmp}/pki"], capture_output=True, text=True,
            check=False
        )
        if started.returncode != 0:
            print(f"etcd did not start: {started.stderr.strip()}", file=sys.stderr)
            return 1
        pid = started.stdout.strip()
        try:
            began = time.monotonic()
            results["etcd"] = bench(f"etcds://127.0.0.1:{port}/bench?pki={tmp}/pki", *sizes)
            print(f"etcd done in {time.monotonic() - began:.1f} s", flush=True)
        finally:
            subprocess.run([ETCD_SH, "stop", pid], check=True)

    print(
        f"{args.processes} processes x {args.ids} ID allocations, x {args.cycles} reserve/release cycles "
        f"on {SHARED_LUS} shared LUs, x {args.events} events"
    )
    print(f"{'metric':40} {'sqlite':>10} {'etcd':>10} {'etcd/sqlite':>12}")
    for metric, value in results["sqlite"].items():
        other = results["etcd"][metric]
        ratio = f"{other / value:.2f}" if value else "-"
        shown = [f"{v:10d}" if isinstance(v, int) else f"{v:10.1f}" for v in (value, other)]
        print(f"{metric:40} {shown[0]} {shown[1]} {ratio:>12}")
    broken = [m for m in results["sqlite"] if m.startswith(("duplicate", "double", "events lost"))]
    return 1 if any(results[b][m] for b in results for m in broken) else 0


if __name__ == "__main__":
    sys.exit(main())
