"""`uniref-deploy preset` and `uniref-deploy edit` end to end, in process (``main([...])``) and as subprocesses.

Bad input (unreadable, truncated, empty or oversized images; no references without a size; more references than
the budget holds; an over-long prompt) must exit with code 2, print ONE stderr line starting with ``error:`` and
leave nothing behind at the ``-o`` path or in its folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from uniref_deploy.runtime.packing import pack_references  # noqa: E402
from uniref_deploy.tools.cli import main  # noqa: E402
from uniref_deploy.tools.model_source import resolve_model  # noqa: E402

PROMPT = "Put the person from picture 1 into the room from picture 2."
LONG_PROMPT = " ".join(["make it blue"] * 400)  # ~1300 text tokens after the template; the limit is 1024
CONSOLE_SCRIPT = Path(sys.executable).parent / "uniref-deploy"


def cli_command() -> list[str]:
    """The installed console script, or the module when the venv has none."""
    if CONSOLE_SCRIPT.is_file():
        return [str(CONSOLE_SCRIPT)]
    return [sys.executable, "-m", "uniref_deploy.tools.cli"]


def save_noise(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def huge_png_header(path: Path, width: int = 9000, height: int = 8000) -> Path:
    """A PNG claiming ``width x height`` (72 MP > the 64 MP limit) without pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Good and bad reference files, written once."""
    d = tmp_path_factory.mktemp("inputs")
    good = save_noise(d / "good.png", 120, 80)
    full = save_noise(d / "full.png", 64, 64, seed=1).read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "garbage.jpg").write_bytes(b"definitely not a JPEG\n" * 8)
    huge_png_header(d / "huge.png")
    return {"good": good, **{p.stem: p for p in d.iterdir()}}


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An empty folder for the -o path; each test checks it is still empty after a failure."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def assert_nothing_written(out_dir: Path) -> None:
    assert list(out_dir.iterdir()) == [], "a failed edit left files behind"


def assert_one_error_line(stderr: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr


# --- bad input, in process -------------------------------------------------------------------------------------

BAD_IMAGE_CASES = {
    "missing": (["missing.png"], "does not exist"),
    "empty": (["empty"], "0 bytes"),
    "garbage": (["garbage"], "cannot be decoded"),
    "truncated": (["truncated"], "cannot be decoded"),
    "over-64MP": (["huge"], "64 MP limit"),
    "bad-after-good": (["good", "truncated"], "cannot be decoded"),
}


@pytest.mark.slow  # tiny preset + torch
@pytest.mark.parametrize("case", list(BAD_IMAGE_CASES))
def test_bad_image_exits_2(tiny_model_dir, inputs, out_dir, capsys, case):
    names, expected = BAD_IMAGE_CASES[case]
    args = []
    for name in names:
        args += ["--image", str(inputs.get(name, out_dir.parent / name))]
    out = out_dir / "edit.png"

    rc = main(["edit", str(tiny_model_dir), *args, "--prompt", PROMPT, "--steps", "2", "-o", str(out)])

    captured = capsys.readouterr()
    assert rc == 2
    assert_one_error_line(captured.err)
    assert expected in captured.err
    assert captured.out == ""
    assert_nothing_written(out_dir)


@pytest.mark.slow  # tiny preset + torch
@pytest.mark.parametrize("size", [[], ["--width", "64"]], ids=["no-size", "width-only"])
def test_zero_references_without_size_exits_2(tiny_model_dir, out_dir, capsys, size):
    rc = main(["edit", str(tiny_model_dir), "--prompt", PROMPT, *size, "--steps", "2", "-o", str(out_dir / "x.png")])
    captured = capsys.readouterr()
    assert rc == 2
    assert_one_error_line(captured.err)
    assert "pass width and height" in captured.err
    assert_nothing_written(out_dir)


@pytest.mark.slow  # tiny preset + torch
def test_more_references_than_the_budget_holds_exits_2(tiny_model_dir, inputs, out_dir, capsys):
    """17 references under the default policy at 1024^2 (each needs 256x256 px; the budget holds 16)."""
    args = ["--image", str(inputs["good"])] * 17
    rc = main(["edit", str(tiny_model_dir), *args, "--prompt", PROMPT, "-o", str(out_dir / "x.png")])
    captured = capsys.readouterr()
    assert rc == 2
    assert_one_error_line(captured.err)
    assert "17 references" in captured.err and "at most 16" in captured.err
    assert_nothing_written(out_dir)


@pytest.mark.slow  # tiny preset + torch
def test_prompt_over_the_text_limit_exits_2(tiny_model_dir, inputs, out_dir, capsys):
    out = out_dir / "x.png"
    rc = main(["edit", str(tiny_model_dir), "--image", str(inputs["good"]), "--prompt", LONG_PROMPT,
               "--width", "64", "--height", "64", "--steps", "2", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    assert_one_error_line(captured.err)
    assert re.search(r"encodes to \d+ text tokens, over the limit of 1024", captured.err)
    assert_nothing_written(out_dir)


def test_unknown_model_exits_2(out_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["edit", "no-such-model", "--prompt", PROMPT, "--width", "64", "--height", "64",
               "-o", str(out_dir / "x.png")])
    captured = capsys.readouterr()
    assert rc == 2
    assert_one_error_line(captured.err)
    assert_nothing_written(out_dir)


# --- bad input, real subprocesses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["truncated-image", "too-many-references", "long-prompt"],
)
@pytest.mark.slow  # tiny preset + torch
def test_subprocess_error_is_one_stderr_line(tiny_model_dir, inputs, out_dir, case):
    """The installed entry point: exit 2, exactly one 'error:' line on stderr (no progress bar, no traceback)."""
    if case == "truncated-image":
        args = ["--image", str(inputs["truncated"]), "--prompt", PROMPT]
    elif case == "too-many-references":
        args = [*(["--image", str(inputs["good"])] * 17), "--prompt", PROMPT]
    else:
        args = ["--image", str(inputs["good"]), "--prompt", LONG_PROMPT, "--width", "64", "--height", "64"]
    out = out_dir / "edit.png"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the warnings a user would see

    proc = subprocess.run([*cli_command(), "edit", str(tiny_model_dir), *args, "--steps", "2", "-o", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)

    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert_nothing_written(out_dir)


# --- happy paths -----------------------------------------------------------------------------------------------


@pytest.mark.slow  # tiny preset + torch
def test_preset_then_edit_writes_the_packed_size(tmp_path, capsys):
    """`preset tiny --out T`, then a 2-reference edit under the default policy (self) and budget (1024).

    At the default output size (the last reference's aspect at 1024^2, 784x1312 here) the tiny model takes ~28 s
    on a 2-core CPU, so the output is set to 256x256; the references are still packed at the 1024^2 budget.
    """
    model = tmp_path / "T"
    assert main(["preset", "tiny", "--out", str(model)]) == 0
    assert "preset 'tiny'" in capsys.readouterr().out
    assert (model / "model_index.json").is_file()

    a = save_noise(tmp_path / "a.png", 120, 80, seed=2)
    b = save_noise(tmp_path / "b.png", 60, 100, seed=3)
    out_dir = tmp_path / "result"
    out = out_dir / "out.png"
    rc = main(["edit", str(model), "--image", str(a), "--image", str(b), "--prompt", PROMPT, "--steps", "2",
               "--budget", "1024", "--width", "256", "--height", "256", "-o", str(out)])
    captured = capsys.readouterr()

    assert rc == 0, captured.err
    layout = pack_references([(120, 80), (60, 100)], 1024, "self", 256, 256)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (layout.target.width, layout.target.height)
        assert np.asarray(img).std() > 0
    assert f"2 reference(s), {layout.num_image_tokens} image tokens" in captured.out
    assert [p.name for p in out_dir.iterdir()] == ["out.png"]  # no temp file left next to it


@pytest.mark.slow  # tiny preset + torch
def test_edit_accepts_a_preset_name(tmp_path, monkeypatch, capsys):
    """`edit tiny` builds the preset into $UNIREF_CACHE once, then reuses it (zero references: plain generation)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("UNIREF_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder called "tiny"
    out = tmp_path / "gen.png"

    rc = main(["edit", "tiny", "--prompt", PROMPT, "--width", "64", "--height", "48", "--steps", "2", "-o", str(out)])

    captured = capsys.readouterr()
    assert rc == 0, captured.err
    with Image.open(out) as img:
        assert img.size == (64, 48)
    assert "0 reference(s)" in captured.out
    built = cache / "presets" / "tiny"
    assert (built / "model_index.json").is_file()
    stamp = (built / "model_index.json").stat().st_mtime_ns
    assert resolve_model("tiny") == ("diffusers", built)
    assert (built / "model_index.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("target", ["blocker/x.png", "blocker/sub/x.png", "x.tiff2", "x"],
                         ids=["parent-is-a-file", "ancestor-is-a-file", "unknown-extension", "no-extension"])
def test_bad_output_path_exits_2_before_any_model(tiny_model_dir, inputs, out_dir, capsys, monkeypatch, target):
    """The output path is checked first: no model is loaded for a path that cannot be written."""
    (out_dir / "blocker").write_text("x")
    monkeypatch.setattr("uniref_deploy.runtime.pipeline.Pipeline.from_pretrained",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    rc = main(["edit", str(tiny_model_dir), "--image", str(inputs["good"]), "--prompt", PROMPT,
               "-o", str(out_dir / target)])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err)


def test_output_format_follows_the_extension(tiny_model_dir, inputs, out_dir):
    out = out_dir / "edit.jpg"
    rc = main(["edit", str(tiny_model_dir), "--image", str(inputs["good"]), "--prompt", PROMPT, "--steps", "1",
               "--width", "32", "--height", "32", "-o", str(out)])
    assert rc == 0
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.size == (32, 32)
def test_scheduler_config_it_cannot_run_exits_2_at_load(tmp_path, capsys):
    """A model folder whose scheduler uses an unported option (time_shift_type "cosine") is refused before any
    weight loads: one stderr line naming the option, exit 2, no traceback."""
    from uniref_deploy.runtime.scheduler import QWEN_IMAGE_SCHEDULER_CONFIG

    model = tmp_path / "m"
    configs = {
        "model_index.json": {"_class_name": "QwenImageEditPlusPipeline"},
        "transformer/config.json": {"in_channels": 64, "joint_attention_dim": 32, "axes_dims_rope": [8, 4, 4]},
        "vae/config.json": {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16},
        "scheduler/scheduler_config.json": {**QWEN_IMAGE_SCHEDULER_CONFIG, "time_shift_type": "cosine"},
    }
    for name, data in configs.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text(json.dumps(data))
    out = tmp_path / "out.png"
    rc = main(["edit", str(model), "--prompt", PROMPT, "--width", "64", "--height", "64", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "time_shift_type" in err[0]
    assert not out.exists()
