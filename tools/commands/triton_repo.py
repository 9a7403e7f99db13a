"""`uniref-deploy triton-repo ART --out REPO`: a Triton model repository (config.pbtxt + Python-backend model.py)."""

from __future__ import annotations

import click


def backend_options(f):
    """--backend / --precision of the served pipeline."""
    f = click.option("--precision", default=None, help="DiT precision (default: the runtime's choice).")(f)
    f = click.option("--backend", type=click.Choice(["auto", "ort", "trt"]), default="auto", show_default=True,
                     help="Runtime backend of each instance.")(f)
    return f


def limit_options(f):
    """--max-references / --max-request-mb: what one request may carry."""
    f = click.option("--max-request-mb", type=click.FloatRange(0.001, 2048), default=32, show_default=True,
                     help="Refuse bigger requests before decoding them.")(f)
    f = click.option("--max-references", type=click.IntRange(0, 64), default=4, show_default=True,
                     help="Reference images per request.")(f)
    return f


@click.command("triton-repo")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), required=True, help="Model repository folder.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Instances per GPU (--kind gpu) or in total (--kind cpu).")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Instance group kind.")
@click.option("--gpus", default=None, help="Comma-separated GPU ids (default: every GPU of the node).")
@backend_options
@limit_options
@click.option("--force", is_flag=True, help="Replace an existing uniref_edit model in --out.")
def command(art, out, instances, kind, gpus, backend, precision, max_references, max_request_mb, force):
    """Write a Triton model repository serving the artifact folder ART (for NVIDIA's tritonserver container)."""
    from uniref_deploy.runtime.errors import InputError
    from uniref_deploy.tools.serving.interface import RequestLimits
    from uniref_deploy.tools.serving.repository import RepositoryOptions, write_repository

    try:
        gpu_ids = tuple(int(g) for g in gpus.split(",")) if gpus else None
    except ValueError as err:
        raise InputError(f"--gpus '{gpus}' is not a comma-separated list of integers.", "e.g. --gpus 0,1") from err
    options = RepositoryOptions(backend=backend, precision=precision, instances=instances, kind=kind, gpus=gpu_ids,
                                limits=RequestLimits(max_references, int(max_request_mb * 2**20)))
    model = write_repository(art, out, options, force=force)
    click.echo(f"wrote {model}/config.pbtxt and {model}/1/model.py ({instances} {kind.upper()} instance(s)"
               f"{' per GPU' if kind == 'gpu' else ''})")
