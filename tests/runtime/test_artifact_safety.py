"""Damaged, concurrent and interrupted artifacts (issue 12): external data is verified at load, manifests that are
not objects are refused, one writer holds an artifact folder at a time, leftovers of killed runs are removed, and
an interrupted ``--force`` re-export leaves the old artifact working."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from uniref_deploy.runtime.errors import InputError, ManifestError  # noqa: E402
from uniref_deploy.runtime.fileio import TEMP_PREFIX  # noqa: E402
from uniref_deploy.runtime.locking import ArtifactLockedError, artifact_lock, remove_stale_temp  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.runtime.pipeline import Pipeline  # noqa: E402
from uniref_deploy.tools.reliability_sweep import run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # the session fixture exports the tiny preset (~40 s)

KW = dict(num_inference_steps=2, width=64, height=64, seed=0, output_type="np")


@pytest.fixture
def art(tiny_external_artifacts: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(tiny_external_artifacts, dst)
    return dst


def _embeds(art: Path) -> np.ndarray:
    d = Manifest.load(art).model.text_hidden_size
    return np.random.default_rng(0).standard_normal((1, 5, d)).astype(np.float32)


def _edit(art: Path) -> np.ndarray:
    """A text-to-image call (every graph is still verified at load; a reference would cost a 1 MP VAE encode)."""
    pipe = Pipeline.from_artifacts(art, load_text_encoder=False)
    return pipe(prompt_embeds=_embeds(art), image=[], **KW)


def _data_file(art: Path, name: str) -> Path:
    g = Manifest.load(art).graph(name)
    assert g.external_data and g.info["external_data_sha256"]
    return art / g.external_data


# ---- 1. external data ----------------------------------------------------------------------------------------


def test_every_graph_has_verified_external_data(art):
    m = Manifest.load(art)
    assert all(g.external_data for g in m.graphs)
    m.verify_files(art)  # intact: passes


@pytest.mark.parametrize("graph", ["dit", "vae_decoder"])
@pytest.mark.parametrize("damage", ["flip", "zero"])
def test_damaged_external_data_is_refused_at_load(art, graph, damage):
    """One flipped byte or a zeroed .data file: refused when the pipeline loads, before any compute."""
    data = _data_file(art, graph)
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    else:
        raw = bytearray(len(raw))
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="does not match the sha256"):
        Pipeline.from_artifacts(art, load_text_encoder=False)
    with pytest.raises(ManifestError, match=data.name):
        Manifest.load(art).verify_files(art)


def test_missing_external_data_is_refused(art):
    _data_file(art, "vae_encoder").unlink()
    with pytest.raises(ManifestError, match="missing"):
        Pipeline.from_artifacts(art, load_text_encoder=False)


def test_export_rerun_does_not_skip_over_damaged_external_data(art):
    """The skip-on-rerun check hashes the .data too: a damaged one is re-exported, not trusted."""
    data = _data_file(art, "dit")
    data.write_bytes(bytes(data.stat().st_size))
    code, _, err = run_cli(["export", str(art / "source"), "--out", str(art), "--dtypes", "fp32",
                            "--no-validate", "--no-ort-fusions"])
    assert code == 0, err
    assert "re-running" in err and "skipped" not in err
    Manifest.load(art).verify_files(art)


# ---- 5. manifests that are not objects --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"[]", b"null", b"42", b"\xff\xfe{", b'{"graphs": 5, "schema_version": 1}'],
                         ids=["list", "null", "number", "not-utf8", "bad-field"])
def test_manifest_that_is_not_an_object_is_a_manifest_error(art, raw):
    (art / "manifest.json").write_bytes(raw)
    with pytest.raises(ManifestError):
        Manifest.load(art)
    code, _, err = run_cli(["inspect", str(art)])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:")


# ---- 12. inspect --verify ---------------------------------------------------------------------------------------


def test_inspect_verify_reports_each_file(art):
    code, out, _ = run_cli(["inspect", str(art), "--verify"])
    manifest = Manifest.load(art)
    text_files = len((manifest.text or {}).get("files", {}))  # the prompt encoder's host files, when exported
    assert code == 0 and out.count("ok ") == 2 * len(manifest.graphs) + 1 + text_files  # + the manifest's config
    data = _data_file(art, "dit")
    data.write_bytes(b"\0" + data.read_bytes()[1:])
    (art / Manifest.load(art).graph("vae_encoder").file).unlink()
    code, out, err = run_cli(["inspect", str(art), "--verify", "--json"])
    rows = {r["file"]: r["status"] for r in json.loads(out)}
    assert code == 1 and err.count("\n") == 1
    assert rows[str(data.relative_to(art))] == "damaged"
    assert rows[Manifest.load(art).graph("vae_encoder").file] == "missing"
    assert sum(s == "ok" for s in rows.values()) == len(rows) - 2


# ---- 6, 8. read-only folders and option values --------------------------------------------------------------------


def test_export_into_a_folder_that_cannot_be_written_is_one_line(art, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker / "art", Path("/sys/uniref-art")):  # under a file; on a read-only file system
        code, _, err = run_cli(["export", str(art / "source"), "--out", str(out), "--no-validate"])
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["export", "SRC", "--out", "ART", "--opset", "5"],
                                  ["calibrate", "ART", "--max-side", "128"],
                                  ["calibrate", "ART", "--max-side", "255"]])
def test_bad_option_values_exit_2(art, argv):
    argv = [str(art / "source") if a == "SRC" else str(art) if a == "ART" else a for a in argv]
    code, _, err = run_cli(argv)
    assert code == 2 and err.count("\n") == 1, err


def test_calibration_options_refuse_a_budget_no_reference_fits():
    from uniref_deploy.calibration.fp8 import CalibrationOptions

    with pytest.raises(InputError, match="256"):
        CalibrationOptions(max_pixels=128 * 128)


# ---- 9, 10. one writer; stale temp files --------------------------------------------------------------------------


def _hold_lock(art: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from uniref_deploy.runtime.locking import artifact_lock
        with artifact_lock({str(art)!r}, "export"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder(art):
    holder = _hold_lock(art)
    try:
        with pytest.raises(ArtifactLockedError, match=f"pid {holder.pid}"), artifact_lock(art, "calibrate"):
            pass
        code, _, err = run_cli(["calibrate", str(art), "--samples", "1", "--steps", "0", "--max-side", "256"])
        assert code == 2 and f"pid {holder.pid}" in err and err.count("\n") == 1
        code, _, err = run_cli(["export", str(art / "source"), "--out", str(art), "--dtypes", "fp32",
                                "--no-validate"])
        assert code == 2 and "being written by another process" in err
        code, _, _ = run_cli(["inspect", str(art), "--verify"])  # readers never block
        assert code == 0
    finally:
        holder.kill()
        holder.wait()
    with artifact_lock(art, "calibrate"):  # released with its holder
        pass


def test_write_stage_removes_stale_temp_files_it_owns(art):
    stale = [art / "onnx" / f"{TEMP_PREFIX}dit.abc123", art / f"{TEMP_PREFIX}manifest.json.x.tmp",
             art / ".uniref-gen-export-zz"]
    stale[0].mkdir()
    (stale[0] / "dit.onnx").write_bytes(b"x")
    stale[1].write_text("{}")
    stale[2].mkdir()
    foreign = art / "onnx" / ".dit.keepme"  # not ours: left alone
    foreign.write_text("x")
    Pipeline.from_artifacts(art, load_text_encoder=False)  # a reader removes nothing
    assert all(p.exists() for p in stale)
    code, _, err = run_cli(["export", str(art / "source"), "--out", str(art), "--dtypes", "fp32",
                            "--no-validate", "--no-ort-fusions"])  # unchanged inputs: skipped, but under the lock
    assert code == 0 and "skipped" in err, err
    assert not any(p.exists() for p in stale) and foreign.exists()


def test_staging_folder_referenced_by_the_manifest_is_kept(art):
    """A run killed between its two manifest saves leaves the manifest pointing into its staging folder."""
    m = json.loads((art / "manifest.json").read_text())
    staged = art / ".uniref-gen-export-k1"
    (staged / "onnx").mkdir(parents=True)
    for g in m["graphs"]:
        for key in ("file", "external_data"):
            shutil.copy(art / g[key], staged / g[key])
            g[key] = f"{staged.name}/{g[key]}"
    (art / "manifest.json").write_text(json.dumps(m))
    assert remove_stale_temp(art) == []
    np.testing.assert_array_equal(_edit(art), _edit(art))  # loads and runs from the staging folder


# ---- 11. interrupted --force re-export ------------------------------------------------------------------------------


KILLER = """
import os, signal, sys
from uniref_deploy.export import exporter, graph_export
from uniref_deploy.runtime import generation
target, after = sys.argv[1], int(sys.argv[2])
calls = []
def killing(real):
    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) > after:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return wrapped
if target == "export_graph":
    exporter.export_graph = killing(exporter.export_graph)
else:
    generation._link_over = killing(generation._link_over)
from uniref_deploy.tools.cli import main
main(["export", sys.argv[3], "--out", sys.argv[4], "--dtypes", "fp32", "--no-validate", "--no-ort-fusions",
      "--force"])
"""


@pytest.mark.parametrize(("target", "after"), [("export_graph", 1), ("export_graph", 2), ("_link_over", 1)],
                         ids=["after-dit", "after-encoder", "mid-switch"])
def test_interrupted_forced_reexport_leaves_a_working_artifact(art, target, after):
    """SIGKILL after some new graphs are written (or halfway through the switch): the artifact still verifies
    and edits exactly as before."""
    before = _edit(art)
    proc = subprocess.run([sys.executable, "-c", KILLER, target, str(after), str(art / "source"), str(art)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-500:]
    Manifest.load(art).verify_files(art)
    np.testing.assert_allclose(_edit(art), before, atol=1e-6)
    code, _, err = run_cli(["export", str(art / "source"), "--out", str(art), "--dtypes", "fp32", "--no-validate",
                            "--no-ort-fusions", "--force"])
    assert code == 0, err
    assert not [p for p in art.rglob(".uniref-*") if p.name != ".uniref.lock"]  # leftovers removed
    Manifest.load(art).verify_files(art)
