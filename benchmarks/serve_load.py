"""Serving load check: `uniref-deploy serve` on an artifact folder, then `load-test` against it.

Usage::

    python benchmarks/serve_load.py --art /tmp/tiny_art --out /tmp/serve_load [--requests 50 --concurrency 4]

Compiles ``tiny`` into ``--art`` when it holds no artifacts. Starts the server on free loopback ports, waits for
readiness, sends ``--requests`` edits (``--steps`` steps, one generated reference, 64x64 output) from
``--concurrency`` gRPC clients, samples the RSS of the server's process tree after the first ``--rss-after``
requests and at the end, stops the server with SIGINT and checks no process of its tree is left.
Writes ``loadtest.json`` and ``loadtest.png``; exits 1 on any failure, an RSS growth over ``--max-rss-growth``,
or a leftover process.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from uniref_deploy.tools.serving.client import EditClient
from uniref_deploy.tools.serving.loadtest import (
    LoadTestOptions,
    process_tree_rss,
    run_load_test,
    write_report,
)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tree_pids(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            kids.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except OSError:
            continue
    out, todo = set(), list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.add(p)
        todo += kids.get(p, [])
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--art", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rss-after", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=0, help="untimed edits first (loads every instance)")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--ready-timeout", type=float, default=600)
    args = ap.parse_args()
    exe = [str(Path(sys.executable).parent / "uniref-deploy")]
    if not (args.art / "manifest.json").is_file():
        subprocess.run([*exe, "compile", "tiny", "--out", str(args.art), "--budgets", "1024"], check=True)

    http, grpc = free_ports(2)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "serve.stderr", "wb") as log:
        server = subprocess.Popen([*exe, "serve", str(args.art), "--host", "127.0.0.1", "--http-port", str(http),
                                   "--grpc-port", str(grpc), "--instances", str(args.instances), "--backend", "ort"],
                                  stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        probe, deadline = EditClient(f"127.0.0.1:{http}", "http", 5), time.monotonic() + args.ready_timeout
        while not probe.ready():
            if server.poll() is not None or time.monotonic() > deadline:
                print(f"server did not become ready; see {args.out / 'serve.stderr'}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"ready: {len(tree_pids(server.pid))} server processes, "
              f"{process_tree_rss(server.pid) / 2**20:.0f} MiB RSS before the first request")
        report = run_load_test(LoadTestOptions(url=f"127.0.0.1:{grpc}", protocol="grpc", requests=args.requests,
                                               concurrency=args.concurrency, steps=args.steps,
                                               server_pid=server.pid, rss_after=args.rss_after,
                                               warmup=args.warmup))
        pids = tree_pids(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=120)
    left = [p for p in pids if alive(p)]
    report["server_exit_code"], report["server_processes_left"] = code, left
    json_path, png_path = write_report(report, args.out)
    lat, rss = report["latency_s"], report["server_rss"]
    print("| requests | ok | failed | concurrency | steps | p50 s | p95 s | p99 s | mean s | req/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {report['requests']} | {report['succeeded']} | {report['failures']} | {args.concurrency} | {args.steps} "
          f"| {lat['p50']:.3f} | {lat['p95']:.3f} | {lat['p99']:.3f} | {lat['mean']:.3f} "
          f"| {report['throughput_rps']:.2f} |")
    print(f"server RSS after {rss['after_first']}: {rss['early_bytes'] / 2**20:.1f} MiB; at the end: "
          f"{rss['end_bytes'] / 2**20:.1f} MiB ({rss['growth'] * 100:+.2f}%); exit code {code}; left: {left}")
    print(f"wrote {json_path} and {png_path}")
    ok = report["failures"] == 0 and abs(rss["growth"]) <= args.max_rss_growth and code == 0 and not left
    if not ok:
        print(json.dumps({k: report[k] for k in ("failures", "first_errors", "server_rss")}), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
