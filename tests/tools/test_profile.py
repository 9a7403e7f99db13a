"""`uniref-deploy profile` on the tiny artifacts: real ONNX Runtime sessions, JSON/Markdown/PNG reports."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

from uniref_deploy.runtime._lazy import is_available  # noqa: E402
from uniref_deploy.tools.cli import main  # noqa: E402
from uniref_deploy.tools.profiling import (  # noqa: E402
    STAGES,
    procedural_images,
    summarise_ort_trace,
    warm_up_models,
)

FAST = ["--steps", "2", "--runs", "1", "--warmup", "0", "--width", "128", "--height", "128", "--budgets", "1024"]


@pytest.fixture(scope="module")
def profile_dir(tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    assert main(["profile", str(tiny_artifacts), "--refs", "0,1", "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.slow  # tiny_artifacts
def test_profile_writes_reports_with_every_stage(profile_dir):
    report = json.loads((profile_dir / "profile.json").read_text())
    assert [(r["backend"], r["refs"]) for r in report["summary"]] == [("ort", 0), ("ort", 1)]
    for row in report["summary"]:
        assert set(row["stages"]) == set(STAGES)
        for p in [*row["stages"].values(), row["dit_step"], row["host_overhead_pct"]]:
            assert set(p) == {"p50", "p90", "p99"} and p["p50"] <= p["p90"] <= p["p99"]
        assert row["stages"]["total"]["p50"] > row["stages"]["dit"]["p50"] > 0
        assert 0 <= row["host_overhead_pct"]["p50"] < 100
    assert report["summary"][0]["image_tokens"] == 64  # the 128x128 target alone
    assert report["summary"][1]["image_tokens"] > 64
    md = (profile_dir / "profile.md").read_text()
    for word in ("text_encode", "vae_encode", "pack_rope", "dit step", "scheduler", "vae_decode", "host overhead",
                 "| p50 ms |", "Per-op"):
        assert word in md
    for png in ("latency_vs_tokens.png", "stage_breakdown.png"):
        assert (profile_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # tiny_artifacts
def test_profile_per_op_breakdown_from_ort(profile_dir):
    ops = json.loads((profile_dir / "profile.json").read_text())["op_profile"][0]
    assert set(ops["graphs"]) == {"dit", "vae_encoder", "vae_decoder"}
    dit = ops["graphs"]["dit"]["ops"]
    assert "MatMul" in dit or "Gemm" in dit or "FusedMatMul" in dit
    assert sum(v["share"] for v in dit.values()) == pytest.approx(1.0)
    assert summarise_ort_trace(profile_dir / ops["graphs"]["dit"]["trace"]) == dit


def test_procedural_references_are_fresh_per_seed():
    a, b = procedural_images(2, 1), procedural_images(2, 2)
    assert a[0].tobytes() != b[0].tobytes() and a[0].size != a[1].size


@pytest.mark.slow  # tiny_artifacts
@pytest.mark.skipif(is_available("tensorrt"), reason="TensorRT is installed here")
def test_profile_trt_unavailable_is_one_line_exit_2(tiny_artifacts, tmp_path, capsys):
    assert main(["profile", str(tiny_artifacts), "--backend", "trt", "--out", str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "TensorRT" in err[0]
    assert not (tmp_path / "profile.json").exists()


@pytest.mark.slow  # builds the tiny preset folders, torch text encoder
@pytest.mark.parametrize("folder", ["tiny_model_dir", "tiny_edit_model_dir"])
def test_warm_up_is_valid_for_every_pipeline_class(folder, request):
    """Edit (exactly one reference) refuses an empty-reference encode; the warm-up sends what the class needs."""
    pytest.importorskip("torch")
    from uniref_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(request.getfixturevalue(folder), text_encoder_dtype="float32")
    assert warm_up_models(pipe) > 0
    assert len(pipe.text_encoder._cache) == 1  # the text model really encoded once


@pytest.mark.slow  # tiny_artifacts
def test_profile_without_references_or_size_profiles_a_square_at_the_budget(tiny_artifacts, tmp_path):
    out = tmp_path / "p"
    args = ["profile", str(tiny_artifacts), "--refs", "0", "--budgets", "256", "--steps", "1", "--runs", "1",
            "--warmup", "0", "--out", str(out)]
    assert main(args) == 0
    row = json.loads((out / "profile.json").read_text())["summary"][0]
    assert row["refs"] == 0 and row["image_tokens"] == (256 // 16) ** 2
