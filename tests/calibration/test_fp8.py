"""``calibrate_fp8`` and ``uniref-deploy calibrate`` on the tiny artifacts (one calibration per module, ~15 s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from uniref_deploy.calibration.dataset import CalibrationSet, DatasetSpec  # noqa: E402
from uniref_deploy.calibration.fp8 import FP8_FILE, CalibrationOptions, calibrate_fp8  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.runtime.rope import RopeCache, RopeConfig  # noqa: E402
from uniref_deploy.tools.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # the tiny_artifacts session fixture compiles a model (minutes on 2 cores)

CLI_ARGS = ["--samples", "2", "--steps", "4", "--max-side", "256"]
OPTIONS = CalibrationOptions(samples=2, eval_steps=4, max_pixels=256 * 256)


@pytest.fixture(scope="module")
def calibrated(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny artifacts, calibrated through the CLI (exit code 0)."""
    art = tmp_path_factory.mktemp("fp8") / "art"
    shutil.copytree(tiny_artifacts, art, symlinks=True)
    assert main(["calibrate", str(art), *CLI_ARGS]) == 0
    return art


def test_manifest_records_graph_and_stage(calibrated):
    m = Manifest.load(calibrated)
    g, ref = m.graph("dit", "fp8"), m.graph("dit", "fp32")
    assert g.file == FP8_FILE and g.inputs == ref.inputs and g.outputs == ref.outputs
    m.verify_files(calibrated, (g.key,))
    assert g.info["quantised_layers"] > 0 and "transformer.proj_out" in g.info["skipped_layers"]
    stage = m.stage("calibrate")
    assert stage is not None and stage.settings["samples"] == 2 and stage.results["figures"]


def test_graph_checks_and_runs_at_two_lengths(calibrated):
    path = calibrated / FP8_FILE
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert any(o.version >= 19 for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    hs = next(i for i in model.graph.input if i.name == "hidden_states")
    assert hs.type.tensor_type.shape.dim[1].dim_param  # dynamic S_img kept
    m = Manifest.load(calibrated)
    rope = RopeCache(RopeConfig.from_transformer_config(m.model.transformer))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for grids, text in (([(8, 8), (8, 8)], 7), ([(16, 12), (8, 6), (6, 8)], 20)):
        s_img = sum(h * w for h, w in grids)
        feeds = {"hidden_states": rng.standard_normal((1, s_img, 16), dtype=np.float32),
                 "encoder_hidden_states": rng.standard_normal((1, text, 32), dtype=np.float32),
                 "encoder_hidden_states_mask": np.ones((1, text), bool),
                 "timestep": np.array([0.5], np.float32), **rope.tables(grids, text)}
        (v,) = sess.run(["velocity"], feeds)
        assert v.shape == (1, s_img, 16) and np.isfinite(v).all()


def test_report_has_sane_figures(calibrated):
    report = json.loads((calibrated / "calibration" / "report.json").read_text())
    assert (calibrated / "calibration" / "report.png").stat().st_size > 1000
    (bucket,) = report["buckets"]
    assert len(bucket["cosine_per_step"]) == 4
    assert 0.99 < bucket["cosine_min"] <= 1.0 + 1e-9
    assert bucket["latent_psnr_db"] > 30 and bucket["image_psnr_db"] > 30
    assert set(report["alternatives"]) == {"per-channel", "per-tensor"}
    assert report["sizes"]["quantised_fp8_over_fp16"] <= 0.55
    assert report["sizes"]["fp8_weight_bytes"] < report["sizes"]["fp16_weight_bytes"]


def test_rerun_with_same_inputs_is_skipped(calibrated):
    said: list[str] = []
    before = (calibrated / FP8_FILE).stat().st_mtime_ns
    calibrate_fp8(calibrated, OPTIONS, progress=said.append)
    assert said == ["calibrate: inputs unchanged; skipped"]
    assert (calibrated / FP8_FILE).stat().st_mtime_ns == before


def test_pipeline_runs_fp8(calibrated):
    from uniref_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_artifacts(calibrated, backend="ort", precision="fp8", load_text_encoder=False)
    assert pipe.backends["dit"].path.name == "dit.fp8.onnx"
    out = pipe(prompt_embeds=np.ones((1, 8, 32), np.float32), width=128, height=128, num_inference_steps=2, seed=0,
               output_type="np")
    assert out.shape == (128, 128, 3) and np.isfinite(out).all()


def test_dataset_spreads_over_references_and_steps(tiny_artifacts):
    m = Manifest.load(tiny_artifacts)
    samples = list(CalibrationSet(m, tiny_artifacts, DatasetSpec(samples=4, max_pixels=512 * 512, seed=3)))
    steps = [s.step for s in samples]
    assert steps == sorted(steps) and steps[0] < 7 and steps[-1] >= 21
    assert all(1 <= s.num_references <= 4 for s in samples)
    assert all(s.feeds["hidden_states"].shape[1] == s.image_tokens == s.feeds["img_cos"].shape[0] for s in samples)


@pytest.mark.parametrize("args", [["--samples", "0"], ["--images", "/nonexistent/dir"]])
def test_cli_bad_input_exits_2(calibrated, args, capsys):
    assert main(["calibrate", str(calibrated), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and ("error" in err.lower())


def test_cli_missing_artifacts_exits_2(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an artifact folder" in err[0]
