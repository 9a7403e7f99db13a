"""`uniref-deploy load-test --url HOST:PORT --out DIR`: client-side latency/throughput of a running server."""

from __future__ import annotations

import click

from uniref_deploy.tools.options import BudgetParam


@click.command("load-test")
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="host:port of the HTTP or gRPC endpoint.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--requests", "n_requests", type=click.IntRange(1, 100000), default=50, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=2, show_default=True)
@click.option("--references", type=click.IntRange(0, 64), default=1, show_default=True,
              help="Generated reference images per edit.")
@click.option("--width", type=click.IntRange(16, 16384), default=64, show_default=True)
@click.option("--height", type=click.IntRange(16, 16384), default=64, show_default=True)
@click.option("--budget", type=BudgetParam(), default=None,
              help="As `edit --budget`: a side (1024), a pixel count or WxH (default: the server's default).")
@click.option("--warmup", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="Untimed edits sent first (cold instances load their text encoder on the first request).")
@click.option("--server-pid", type=int, default=None, help="Sample the RSS of this process and its children.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for loadtest.json and loadtest.png.")
def command(url, protocol, n_requests, concurrency, steps, references, width, height, budget, warmup, server_pid,
            out_dir):
    """Send edits to a running `uniref-deploy serve`; report p50/p95/p99 latency, throughput and failures."""
    from pathlib import Path

    from uniref_deploy.runtime.errors import CheckFailed
    from uniref_deploy.tools.serving.loadtest import LoadTestOptions, run_load_test, write_report

    opts = LoadTestOptions(url=url, protocol=protocol, requests=n_requests, concurrency=concurrency, steps=steps,
                           references=references, width=width, height=height, budget=budget, warmup=warmup,
                           server_pid=server_pid)
    report = run_load_test(opts)
    json_path, png_path = write_report(report, Path(out_dir))
    lat, rss = report["latency_s"], report["server_rss"]
    click.echo(f"{report['succeeded']}/{report['requests']} ok, {report['failures']} failed; "
               f"{report['throughput_rps']:.2f} req/s; latency p50 {lat.get('p50', float('nan')):.3f} s, "
               f"p95 {lat.get('p95', float('nan')):.3f} s, p99 {lat.get('p99', float('nan')):.3f} s")
    if rss["growth"] is not None:
        click.echo(f"server RSS {rss['early_bytes'] / 2**20:.0f} MiB after {rss['after_first']} -> "
                   f"{rss['end_bytes'] / 2**20:.0f} MiB at the end ({rss['growth'] * 100:+.1f}%)")
    click.echo(f"wrote {json_path} and {png_path}")
    if report["failures"]:
        raise CheckFailed(f"{report['failures']} of {report['requests']} requests failed: {report['first_errors'][0]}")
