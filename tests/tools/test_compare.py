"""`uniref-deploy compare` on the tiny artifacts: ORT vs the torch source model, pass, forced failure, trt."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

from uniref_deploy.runtime._lazy import is_available  # noqa: E402
from uniref_deploy.tools.cli import main  # noqa: E402
from uniref_deploy.tools.comparing import parse_tolerances, tolerance  # noqa: E402

FAST = ["--steps", "2", "--refs", "1", "--width", "128", "--height", "128"]


@pytest.mark.slow  # tiny_artifacts
def test_compare_ort_torch_passes_with_json(tiny_artifacts, capsys):
    assert main(["compare", str(tiny_artifacts), "--backends", "ort,torch", "--json", *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["reference"] == "ort"
    names = [r["name"].split("/", 1)[1] for r in report["results"]]
    assert {"vae_encoder.latent", "dit.velocity", "vae_decoder.image", "image.psnr_db"} <= set(names)
    for r in report["results"]:
        assert r["backend"] == "torch" and r["passed"]
        if "cosine" in r:
            assert r["cosine"] > 0.9999


@pytest.mark.slow  # tiny_artifacts
def test_compare_fails_with_exit_1_under_absurd_tolerance(tiny_artifacts, capsys):
    code = main(["compare", str(tiny_artifacts), "--backends", "ort,torch", "--tolerance", "1e-15", *FAST[:2],
                 "--refs", "0", *FAST[4:]])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL" in captured.out and "rel_max" in captured.out
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("error:") and "comparisons failed" in err[-1]


def test_tolerances_per_tensor_with_default():
    tol = parse_tolerances(["2e-3", "dit.velocity=1e-2", "1ref:5tok/vae_decoder.image=0.5"], "fp32")
    assert tolerance("3ref:9tok/vae_encoder.latent", tol) == 2e-3
    assert tolerance("3ref:9tok@t0.9/dit.velocity", tol) == 1e-2
    assert tolerance("1ref:5tok/vae_decoder.image", tol) == 0.5
    assert tol["image.psnr_db"] == 40.0


@pytest.mark.slow  # tiny_artifacts
@pytest.mark.skipif(is_available("tensorrt"), reason="TensorRT is installed here")
def test_compare_trt_unavailable_is_one_line_exit_2(tiny_artifacts, capsys):
    assert main(["compare", str(tiny_artifacts), "--backends", "ort,trt", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "TensorRT" in err[0]


@pytest.mark.slow  # tiny_artifacts
def test_compare_needs_two_backends(tiny_artifacts, capsys):
    assert main(["compare", str(tiny_artifacts), "--backends", "ort"]) == 2
    assert "at least two" in capsys.readouterr().err
