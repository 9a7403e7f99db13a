"""What an artifact folder holds: graphs, buckets, engines, validation, calibration, stages and the engine plan."""

from __future__ import annotations

import json
from pathlib import Path

from uniref_deploy.runtime.artifacts import CALIBRATION_REPORT, ENGINE_PLAN, VALIDATION_REPORT
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import UnirefError
from uniref_deploy.runtime.manifest import MANIFEST_NAME, Manifest


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _axes(specs) -> list[dict]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape),
             "dynamic_axes": {str(k): v for k, v in s.dynamic_axes.items()}} for s in specs]


def inspect_artifacts(art: str | Path) -> dict:
    """A JSON-ready description of ``art``.

    Raises:
        ManifestError: no readable manifest.
    """
    art = Path(art)
    m = Manifest.load(art)
    graphs = []
    for g in m.graphs:
        files = [g.file] + ([g.external_data] if g.external_data else [])
        size = sum((art / f).stat().st_size for f in files if (art / f).is_file())
        graphs.append({"name": g.name, "precision": g.precision, "variant": g.variant or "portable", "file": g.file,
                       "external_data": g.external_data,
                       "bytes": size, "present": (art / g.file).is_file(), "sha256": g.sha256,
                       "inputs": _axes(g.inputs), "outputs": _axes(g.outputs), "info": g.info})
    buckets = [{"name": b.name, "side": b.side, "pixels": b.pixels, "max_image_tokens": b.max_image_tokens}
               for b in m.budgets]
    engines = [{"graph": e.graph, "precision": e.precision, "file": e.file, "budgets": list(e.budgets),
                "present": (art / e.file).is_file(), "provenance": e.provenance} for e in m.engines]
    calibrated = m.stage("calibrate")
    return {
        "artifacts": str(art), "schema_version": m.schema_version, "family": m.model.family,
        "text_encoder_dir": m.model.text_encoder_dir, "text": _text_record(art, m.text), "graphs": graphs, "buckets": buckets, "engines": engines,
        "validation": _read_json(art / VALIDATION_REPORT),
        "calibration": _read_json(art / CALIBRATION_REPORT) or (calibrated.results if calibrated else None),
        "stages": [{"stage": s.stage, "seconds": s.seconds, "settings": s.settings, "results": s.results,
                    "tool_versions": s.tool_versions} for s in m.stages],
        "engine_plan": _read_json(art / ENGINE_PLAN),
    }


def _text_record(art: Path, text: dict | None) -> dict | None:
    """The exported prompt encoder's host files (manifest ``text``) with their sizes; None when not exported."""
    if not text:
        return None
    files = text.get("files", {})
    return {**{k: v for k, v in text.items() if k != "files"}, "files": sorted(files),
            "bytes": sum((art / f).stat().st_size for f in files if (art / f).is_file())}


def verify_artifacts(art: str | Path) -> list[dict]:
    """Hash every file the manifest lists (graphs, external data, engines): one row ``{file, status}`` each,
    status "ok", "damaged" or "missing".

    Raises:
        ManifestError: no readable manifest.
    """
    manifest = Manifest.load(art)
    rows = [{"file": f, "status": s} for f, s in manifest.file_status(art, engines=True)]
    return [{"file": MANIFEST_NAME, "status": _config_status(manifest)}, *rows]


def _config_status(manifest: Manifest) -> str:
    """"ok" when the runtime can read every model-config value it needs (RoPE, scheduler, latent shapes)."""
    from uniref_deploy.runtime.rope import RopeConfig
    from uniref_deploy.runtime.scheduler import FlowMatchEulerConfig

    m = manifest.model
    try:
        RopeConfig.from_transformer_config(m.transformer)
        FlowMatchEulerConfig.from_dict(m.scheduler)
        _ = m.latent_channels, m.text_hidden_size, m.vae["latents_mean"], m.vae["latents_std"]
    except (KeyError, TypeError, ValueError, UnirefError):
        return "damaged"
    return "ok"


def format_verify(rows: list[dict]) -> str:
    """One line per file: status then path."""
    return "\n".join(f"{r['status']:<8} {r['file']}" for r in rows) or "no files listed in the manifest"


def _bucket(pixels: object) -> str:
    return f"b{Budget.from_pixels(pixels).name}" if isinstance(pixels, int) and pixels > 0 else "?"


def _shape(spec: dict) -> str:
    return f"{spec['name']}:{spec['dtype']}[{','.join(map(str, spec['shape']))}]"


def _short(value, width: int = 90) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def format_text(info: dict) -> str:
    """A human-readable summary of ``inspect_artifacts``."""
    lines = [f"artifacts: {info['artifacts']} (schema {info['schema_version']}, family {info['family']})",
             f"text encoder: {info['text_encoder_dir']}"]
    text = info.get("text")
    if text:
        lines.append(f"prompt encoder: exported (text_vision + text_encoder), {len(text['files'])} host file(s) in "
                     f"{text['dir']}/ ({text['bytes'] / 2**20:.1f} MiB), <= {text['vision_max_patches']} patches, "
                     f"<= {text['max_text_len']} tokens")
    lines += ["", "graphs:"]
    for g in info["graphs"]:
        state = "" if g["present"] else "  MISSING"
        lines.append(f"  {g['name']:<12} {g['precision']:<5} {g['variant']:<8} {g['file']:<28} "
                     f"{g['bytes'] / 2**20:8.1f} MiB{state}")
        lines.append(f"      in : {', '.join(_shape(s) for s in g['inputs'])}")
        lines.append(f"      out: {', '.join(_shape(s) for s in g['outputs'])}")
        if g["info"]:
            lines.append(f"      info: {_short(g['info'], 110)}")
    lines += ["", "buckets:"] + [f"  {b['name']}: {b['pixels']} px, <= {b['max_image_tokens']} image tokens"
                                 for b in info["buckets"]]
    lines += ["", "engines:" + ("" if info["engines"] else " none built")]
    for e in info["engines"]:
        lines.append(f"  {e['graph']:<12} {e['precision']:<5} {e['file']} {'' if e['present'] else 'MISSING '}"
                     f"profiles {', '.join(_bucket(b) for b in e['budgets'])}")
        lines.append(f"      {_short({k: v for k, v in e['provenance'].items() if k != 'profiles'}, 100)}")
    rows = info["validation"] or []
    lines += ["", "validation:" + ("" if rows else " none")]
    for v in rows:
        metric = v.get("metric", "rel_max")
        lines.append(f"  {v['graph']:<12} {v['precision']:<5} {v['sample']:<34} {metric}={v[metric]:.2e} "
                     f"cos={v['cosine']:.6f} tol={v['tolerance']} {'ok' if v['passed'] else 'FAIL'}")
    lines += ["", "calibration: " + ("none" if info["calibration"] is None else _short(info["calibration"], 100))]
    lines += ["", "stages:"] + [f"  {s['stage']:<10} {s['seconds']:7.1f} s  {_short(s['results'], 80)}"
                                for s in info["stages"]]
    plan = info["engine_plan"]
    if plan is None:
        lines += ["", f"engine plan: none ({ENGINE_PLAN} absent)"]
    else:
        items = plan["engines"]
        lines += ["", f"engine plan: {len(items)} engine(s) planned"]
        for it in items[:20]:
            lines.append(f"  {it['engine_file']} from {it['onnx_file']}")
            for i, prof in enumerate(it.get("profiles", [])):
                axes = ", ".join(f"{a} {r['min']}/{r['opt']}/{r['max']}" for a, r in prof.get("axes", {}).items())
                lines.append(f"      profile {i}: {_bucket(prof.get('budget'))}: {axes}")
    return "\n".join(lines)
