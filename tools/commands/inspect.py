"""`uniref-deploy inspect ART [--json] [--verify]`: graphs, buckets, engines, validation, calibration, stages, plan."""

from __future__ import annotations

import click


@click.command("inspect")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
@click.option("--verify", is_flag=True,
              help="Hash every graph, external data and engine file: ok / damaged / missing; exit 1 on any fault.")
def command(art, as_json, verify):
    """Describe the artifact folder ART from its manifest and reports."""
    import json

    from uniref_deploy.runtime.errors import CheckFailed
    from uniref_deploy.tools.inspecting import format_text, format_verify, inspect_artifacts, verify_artifacts

    if verify:
        rows = verify_artifacts(art)
        click.echo(json.dumps(rows, indent=2) if as_json else format_verify(rows))
        bad = [r for r in rows if r["status"] != "ok"]
        if bad:
            raise CheckFailed(f"{len(bad)} of {len(rows)} artifact file(s) are damaged or missing: "
                              f"{', '.join(r['file'] for r in bad[:5])}.", "re-run the stage that wrote them.")
        return
    info = inspect_artifacts(art)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_text(info))
