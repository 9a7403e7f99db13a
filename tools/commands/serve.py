"""`uniref-deploy serve ART`: Triton Inference Server with the `uniref_edit` model until SIGINT/SIGTERM."""

from __future__ import annotations

import click

from uniref_deploy.tools.commands.triton_repo import backend_options, limit_options


@click.command("serve")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (HTTP and gRPC).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (each its own pipeline and caches); Triton queues requests between them.")
@backend_options
@limit_options
@click.option("--ready-timeout", type=click.FloatRange(1, 3600), default=600, show_default=True,
              help="Seconds to wait for the model to load.")
@click.pass_context
def command(ctx, art, host, http_port, grpc_port, instances, backend, precision, max_references, max_request_mb,
            ready_timeout):
    """Serve the artifact folder ART behind Triton (PyTriton's bundled tritonserver) until SIGINT/SIGTERM."""
    import signal
    import tempfile
    import threading
    from pathlib import Path

    from uniref_deploy.tools.serving.interface import MODEL_NAME, RequestLimits
    from uniref_deploy.tools.serving.repository import RepositoryOptions, write_repository
    from uniref_deploy.tools.serving.server import ServerAddress, ServerError, TritonServer

    options = RepositoryOptions(backend=backend, precision=precision, instances=instances,
                                limits=RequestLimits(max_references, int(max_request_mb * 2**20)))
    address = ServerAddress(host, http_port, grpc_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="uniref-serve-") as work:
        write_repository(art, Path(work) / "models", options)
        server = TritonServer(Path(work) / "models", address, Path(work),
                              log_to_stderr=(ctx.obj or {}).get("verbose", 0) > 0)
        try:
            server.start()
            if server.wait_ready(MODEL_NAME, ready_timeout, cancel=stop):
                click.echo(f"serving {MODEL_NAME} ({instances} instance(s)) on http://{address.http_url} and "
                           f"grpc://{address.grpc_url}; SIGINT/SIGTERM stops", err=True)
            while not stop.wait(0.5):
                if server.process.poll() is not None:
                    raise ServerError(f"tritonserver exited on its own (code {server.process.returncode}): "
                                      f"{server.last_error()}")
        finally:
            code = server.stop()
    click.echo(f"stopped (tritonserver exit code {code})", err=True)
