"""The export stage on the tiny preset: manifest contract, validation, dynamic axes, skip-on-rerun, damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from uniref_deploy.runtime.errors import ManifestError  # noqa: E402
from uniref_deploy.runtime.manifest import Manifest  # noqa: E402
from uniref_deploy.runtime.packing import pack_references  # noqa: E402

pytestmark = pytest.mark.slow  # the tiny_artifacts session fixture compiles a model (minutes on 2 cores)


def test_manifest_lists_every_graph_with_hashes_and_axes(tiny_artifacts: Path) -> None:
    manifest = Manifest.load(tiny_artifacts)
    keys = {g.key for g in manifest.graphs}
    assert {"dit.fp32", "dit.fp16", "vae_encoder.fp32", "vae_decoder.fp32", "vae_encoder.fp16"} <= keys
    manifest.verify_files(tiny_artifacts)  # every sha256 matches
    dit = manifest.graph("dit", "fp32")
    assert dit.inputs[0].shape == ("batch", "img_tokens", 16)
    model = onnx.load(str(tiny_artifacts / dit.file), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["hidden_states"] == ["batch", "img_tokens", 16]
    assert dims["txt_cos"] == ["txt_tokens", 8]
    assert model.opset_import[0].version >= 17
    assert manifest.stage("export").results["validation_passed"]
    assert manifest.stage("runtime_check").results["passed"]


def test_validation_report_and_trt_lint(tiny_artifacts: Path) -> None:
    rows = json.loads((tiny_artifacts / "reports" / "export_validation.json").read_text())
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    assert len([r for r in fp32 if r["graph"] == "dit"]) >= 3
    assert all(r["rel_max"] <= 1e-4 for r in fp32), [r["rel_max"] for r in fp32]
    assert all(r["passed"] for r in rows)
    lint = json.loads((tiny_artifacts / "reports" / "trt_lint.json").read_text())
    for name, report in lint.items():
        assert report["passed"], (name, report["unsupported_ops"], report["float64"], report["static_dynamic_axes"])
    for g in Manifest.load(tiny_artifacts).graphs:  # no float64 anywhere (TensorRT has none)
        model = onnx.load(str(tiny_artifacts / g.file))
        assert all(t.data_type != onnx.TensorProto.DOUBLE for t in model.graph.initializer)


def _dit_feeds(config, layout, txt, batch=1, pad=0, seed=0):
    from uniref_deploy.export.samples import dit_sample

    return dit_sample(config, layout, txt, pad=pad, batch=batch, seed=seed).feeds


DIT_FILES = ("onnx/dit.onnx", "onnx/dit.ort.onnx")  # the portable graph and its ONNX Runtime-fused variant


@pytest.mark.parametrize("graph", DIT_FILES)
def test_dit_graph_runs_at_two_lengths_and_matches_torch(tiny_artifacts: Path, tiny_model_dir: Path,
                                                         graph: str) -> None:
    import diffusers

    from uniref_deploy.export.qwen_image import QwenImageDitForExport

    manifest = Manifest.load(tiny_artifacts)
    sess = ort.InferenceSession(str(tiny_artifacts / graph), providers=["CPUExecutionProvider"])
    tr = diffusers.QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()
    ref = QwenImageDitForExport(tr).eval()
    names = [i.name for i in sess.get_inputs()]
    lengths = set()
    for sizes, w, h, txt in (([(96, 64)], 64, 48, 5), ([(64, 64), (32, 128)], 128, 64, 40)):
        layout = pack_references(sizes, 128 * 128, policy="per-image", width=w, height=h)
        feeds = _dit_feeds(manifest.model, layout, txt)
        out = sess.run(None, feeds)[0]
        with torch.no_grad():
            expected = ref(*[torch.from_numpy(np.array(feeds[n])) for n in names]).numpy()
        assert out.shape == expected.shape == (1, layout.num_image_tokens, 16)
        assert np.abs(out - expected).max() <= 1e-4 * np.abs(expected).max()
        lengths.add((layout.num_image_tokens, txt))
    assert len(lengths) == 2


def test_batched_cfg_equals_two_calls(tiny_artifacts: Path) -> None:
    """cond + uncond in one batch (text padded and masked) equals two separate calls: batched CFG is safe."""
    manifest = Manifest.load(tiny_artifacts)
    sess = ort.InferenceSession(str(tiny_artifacts / "onnx/dit.onnx"), providers=["CPUExecutionProvider"])
    layout = pack_references([(96, 64)], 128 * 128, policy="per-image", width=64, height=64)
    cond = _dit_feeds(manifest.model, layout, 12, seed=1)
    uncond = _dit_feeds(manifest.model, layout, 7, seed=2)
    uncond["hidden_states"] = cond["hidden_states"]
    uncond["timestep"] = cond["timestep"]
    separate = [sess.run(None, f)[0] for f in (cond, uncond)]
    pad = 12 - 7
    batched = dict(cond)
    batched["hidden_states"] = np.concatenate([cond["hidden_states"]] * 2)
    batched["timestep"] = np.concatenate([cond["timestep"]] * 2)
    text_u = np.concatenate([uncond["encoder_hidden_states"], np.zeros((1, pad, 32), np.float32)], axis=1)
    batched["encoder_hidden_states"] = np.concatenate([cond["encoder_hidden_states"], text_u])
    batched["encoder_hidden_states_mask"] = np.array([[True] * 12, [True] * 7 + [False] * pad])
    out = sess.run(None, batched)[0]
    np.testing.assert_allclose(out[0], separate[0][0], atol=1e-5)
    np.testing.assert_allclose(out[1], separate[1][0], atol=1e-5)


def test_trailing_text_padding_changes_nothing(tiny_artifacts: Path) -> None:
    """What trim_text_padding relies on: padded + masked text gives the output of the trimmed text."""
    from uniref_deploy.runtime.pipeline import trim_text_padding

    manifest = Manifest.load(tiny_artifacts)
    sess = ort.InferenceSession(str(tiny_artifacts / "onnx/dit.onnx"), providers=["CPUExecutionProvider"])
    layout = pack_references([(96, 64)], 128 * 128, policy="per-image", width=64, height=64)
    padded = _dit_feeds(manifest.model, layout, 12, pad=4, seed=5)
    embeds, mask = trim_text_padding(padded["encoder_hidden_states"], padded["encoder_hidden_states_mask"])
    assert embeds.shape[1] == 8 and mask.all()
    trimmed = dict(padded, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                   txt_cos=padded["txt_cos"][:8], txt_sin=padded["txt_sin"][:8])
    np.testing.assert_allclose(sess.run(None, trimmed)[0], sess.run(None, padded)[0], rtol=0, atol=1e-5)


def test_fused_graph_refuses_padded_text(tiny_artifacts: Path) -> None:
    from uniref_deploy.runtime.backends.ort import OrtBackend
    from uniref_deploy.runtime.errors import BackendError

    manifest = Manifest.load(tiny_artifacts)
    layout = pack_references([(96, 64)], 128 * 128, policy="per-image", width=64, height=64)
    with OrtBackend(manifest.graph("dit", "fp32", "ort"), tiny_artifacts) as dit:
        assert dit.infer(_dit_feeds(manifest.model, layout, 9))["velocity"].shape == (1, layout.num_image_tokens, 16)
        with pytest.raises(BackendError, match="without the text mask"):
            dit.infer(_dit_feeds(manifest.model, layout, 9, pad=2))


def test_ort_fused_variant_is_recorded_and_preferred(tiny_artifacts: Path) -> None:
    """dit.fp32.ort: fusions that fired, contrib ops, validation; the ORT backends pick it unless fused=False."""
    from uniref_deploy.runtime.backends.ort import OrtBackendFactory

    manifest = Manifest.load(tiny_artifacts)
    fused = manifest.graph("dit", "fp32", "ort")
    assert fused.file == "onnx/dit.ort.onnx" and fused.key == "dit.fp32.ort"
    assert fused.info["source"] == "onnx/dit.onnx" and fused.info["validation"]["passed"]
    assert {"rms_normalization", "sdpa_via_mha", "gelu", "unmasked_attention"} <= set(fused.info["fusions"])
    assert fused.info["ignores_text_mask"] is True
    assert {"MultiHeadAttention", "FastGelu"} <= set(fused.info["contrib_ops"])
    portable = onnx.load(str(tiny_artifacts / "onnx/dit.onnx"), load_external_data=False)
    assert all(onnx.defs.has(n.op_type, n.domain or "") for n in portable.graph.node)  # TensorRT's graph: plain ONNX
    lint = json.loads((tiny_artifacts / "reports/trt_lint.json").read_text())
    assert "dit.fp32" in lint and not any(k.endswith(".ort") for k in lint)
    rows = json.loads((tiny_artifacts / "reports/export_validation.json").read_text())
    from uniref_deploy.export.samples import LAYOUT_CASES

    padded = tuple(f"txt={txt}" for _, txt, pad in LAYOUT_CASES if pad)
    unpadded = [r for r in rows if r["graph"] == "dit" and r["precision"] == "fp32" and not r["sample"].endswith(padded)]
    assert sorted(r["sample"] for r in rows if r["graph"] == "dit.ort") == sorted(r["sample"] for r in unpadded)
    chosen = OrtBackendFactory.create(manifest.model, tiny_artifacts, manifest)
    assert chosen["dit"].graph.variant == "ort" and chosen["vae_decoder"].graph.variant == ""
    assert OrtBackendFactory.create(manifest.model, tiny_artifacts, manifest, fused=False)["dit"].graph.variant == ""


def test_vae_graphs_run_at_two_sizes(tiny_artifacts: Path) -> None:
    enc = ort.InferenceSession(str(tiny_artifacts / "onnx/vae_encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(tiny_artifacts / "onnx/vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    for h, w in ((64, 96), (160, 32)):
        z = enc.run(None, {"image": np.zeros((1, 3, h, w), np.float32)})[0]
        assert z.shape == (1, 4, h // 8, w // 8)
        img = dec.run(None, {"latent": z})[0]
        assert img.shape == (1, 3, h, w) and np.isfinite(img).all()


def test_rerun_with_unchanged_inputs_is_skipped(copy_artifacts) -> None:
    from uniref_deploy.export.exporter import ExportOptions, export_onnx

    art = copy_artifacts()
    before = Manifest.load(art).stage("export")
    messages: list[str] = []
    export_onnx(art / "source", art, ExportOptions(budgets=(1024 * 1024,), dtypes=("fp32", "fp16")),
                progress=messages.append)
    assert any("skipped" in m for m in messages), messages
    assert Manifest.load(art).stage("export") == before


def test_damaged_graph_is_refused_with_one_line(copy_artifacts, tmp_path: Path) -> None:
    from uniref_deploy.runtime.pipeline import Pipeline
    from uniref_deploy.tools.cli import main

    art = copy_artifacts()
    for name in DIT_FILES:
        dit = art / name
        data = bytearray(dit.read_bytes())
        data[len(data) // 2] ^= 0xFF
        dit.write_bytes(bytes(data))
    for fused in (True, False):  # the ORT-fused graph (default) and the portable one: refused at load
        with pytest.raises(ManifestError, match="sha256"):
            pipe = Pipeline.from_artifacts(art, backend="ort", load_text_encoder=False, fused=fused)
            pipe(prompt_embeds=np.zeros((1, 4, 32), np.float32), width=64, height=64, num_inference_steps=1)
    out = tmp_path / "out.png"
    rc = main(["edit", str(art), "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1", "-o", str(out)])
    assert rc == 2 and not out.exists()


def test_export_cli_rejects_a_folder_that_is_not_a_model(tmp_path: Path, capsys) -> None:
    from uniref_deploy.tools.cli import main

    (tmp_path / "m").mkdir()
    rc = main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "art")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:")
