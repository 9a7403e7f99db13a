"""`uniref-deploy inspect ART [--json]`: graphs, buckets, engines, validation, calibration, stages, engine plan."""

from __future__ import annotations

import click


@click.command("inspect")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def command(art, as_json):
    """Describe the artifact folder ART from its manifest and reports."""
    import json

    from uniref_deploy.tools.inspecting import format_text, inspect_artifacts

    info = inspect_artifacts(art)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_text(info))
