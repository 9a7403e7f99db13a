"""Client-side load test of a running ``uniref_edit`` server: latency percentiles, throughput, failures, RSS.

``run_load_test`` sends ``requests`` edits from ``concurrency`` threads (one client each), records each
request's latency and outcome, and, given the server's pid, the resident memory of its whole process tree
(tritonserver and its instance processes) after the first ``rss_after`` requests and at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.fileio import atomic_path, atomic_write_text
from uniref_deploy.tools.serving.client import EditClient, EditRequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadTestOptions:
    """One load test.

    Args:
        url (str): ``host:port`` of the endpoint. protocol (str): ``http`` or ``grpc``.
        requests (int): edits to send (default 50). concurrency (int): client threads (default 4).
        steps (int): denoising steps per edit (default 2). references (int): generated references per edit.
        width, height (int): output size. budget (Budget | int | None): a ``Budget``, or an int read as
            ``--budget`` (a side up to 8192, else pixels); None = the server default.
        server_pid (int | None): the server's pid (tree RSS is sampled when given). rss_after (int): early sample.
        warmup (int): untimed edits sent first (same concurrency), e.g. to load each instance's text encoder.
    """

    url: str = "127.0.0.1:8000"
    protocol: str = "http"
    requests: int = 50
    concurrency: int = 4
    steps: int = 2
    references: int = 1
    width: int = 64
    height: int = 64
    budget: Budget | int | None = None
    prompt: str = "Make the sky in picture 1 purple."
    server_pid: int | None = None
    rss_after: int = 10
    timeout_s: float = 600.0
    warmup: int = 0


@dataclass
class _Record:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests, in completion order
    done_at: list[float] = field(default_factory=list)  # seconds since start, successful requests
    errors: list[str] = field(default_factory=list)
    rss_early: int | None = None


def process_tree_rss(pid: int) -> int | None:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc), or None when unreadable."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            if p == pid:
                return None
        todo += children.get(p, [])
    return total


def reference_pngs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` small seeded noise PNGs (different sizes) to send as references."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48 + 16 * i, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def run_load_test(opts: LoadTestOptions) -> dict:
    """Run the load test; returns the report (options, latency percentiles, throughput, failures, RSS)."""
    images = reference_pngs(opts.references)
    local = threading.local()
    rec, lock = _Record(), threading.Lock()
    extra = {"budget": opts.budget} if opts.budget is not None else {}

    def client() -> EditClient:
        if not hasattr(local, "client"):
            local.client = EditClient(opts.url, opts.protocol, opts.timeout_s)
        return local.client

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            client().edit(opts.prompt, images, steps=opts.steps, seed=i, width=opts.width, height=opts.height,
                              **extra)
            ok, err = True, None
        except EditRequestError as e:
            ok, err = False, str(e)
        t1 = time.perf_counter()
        with lock:
            if ok:
                rec.latencies.append(t1 - t0)
                rec.done_at.append(t1 - start)
            else:
                rec.errors.append(err)
            if len(rec.latencies) + len(rec.errors) == opts.rss_after and opts.server_pid:
                rec.rss_early = process_tree_rss(opts.server_pid)

    def warm(i: int) -> None:  # untimed; a server that fails here fails the timed run too
        with contextlib.suppress(EditRequestError):
            client().edit(opts.prompt, images, steps=opts.steps, seed=10**6 + i, width=opts.width,
                          height=opts.height, **extra)

    if opts.warmup:
        with ThreadPoolExecutor(max_workers=opts.concurrency) as pool:
            list(pool.map(warm, range(opts.warmup)))
    with ThreadPoolExecutor(max_workers=opts.concurrency) as pool:
        start = time.perf_counter()
        list(pool.map(one, range(opts.requests)))
        wall = time.perf_counter() - start
    rss_end = process_tree_rss(opts.server_pid) if opts.server_pid else None
    return summarize(opts, rec, wall, rss_end)


def summarize(opts: LoadTestOptions, rec: _Record, wall_s: float, rss_end: int | None) -> dict:
    lat = np.asarray(rec.latencies, dtype=np.float64)
    pct = {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)} if lat.size else {}
    growth = (rss_end / rec.rss_early - 1.0) if rec.rss_early and rss_end else None
    return {
        "options": {**asdict(opts), "budget": None if opts.budget is None else Budget.parse(opts.budget).name},
        "requests": opts.requests,
        "succeeded": int(lat.size),
        "failures": len(rec.errors),
        "first_errors": sorted(set(rec.errors))[:5],
        "wall_s": wall_s,
        "throughput_rps": lat.size / wall_s if wall_s > 0 else 0.0,
        "latency_s": {**pct, "mean": float(lat.mean()) if lat.size else None,
                      "max": float(lat.max()) if lat.size else None},
        "latencies_s": rec.latencies,
        "completed_at_s": rec.done_at,
        "server_rss": {"after_first": opts.rss_after, "early_bytes": rec.rss_early, "end_bytes": rss_end,
                       "growth": growth},
    }


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """``loadtest.json`` and ``loadtest.png`` (latency per request over time, latency histogram)."""
    from uniref_deploy.tools.plots import _plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "loadtest.json", out_dir / "loadtest.png"
    atomic_write_text(json_path, json.dumps(report, indent=2))
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    lat = report["latency_s"]
    ax1.plot(report["completed_at_s"], report["latencies_s"], "o", ms=3)
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        if q in lat:
            ax1.axhline(lat[q], ls=style, color="gray", label=f"{q} {lat[q]:.2f} s")
    o = report["options"]
    ax1.set(xlabel="completed at (s)", ylabel="latency (s)",
            title=f"{report['succeeded']}/{report['requests']} ok, concurrency {o['concurrency']}, "
                  f"{report['throughput_rps']:.2f} req/s")
    ax1.legend(fontsize=8)
    ax2.hist(report["latencies_s"], bins=20)
    ax2.set(xlabel="latency (s)", ylabel="requests", title=f"{o['protocol']}, {o['steps']} steps, {o['references']} ref")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return json_path, png_path
