"""A hostile-but-fair sweep of bad inputs over the CLI and the Python API, plus SIGKILLed write stages.

``python -m uniref_deploy.tools.reliability_sweep [WORKDIR]`` builds one tiny artifact (external data forced, so
``.onnx.data`` files exist), then runs every probe and prints the counts:

* ``tracebacks``: an exception that is not a ``UnirefError`` escaped (API), or the CLI printed a traceback;
* ``wrong_exit0``: a bad input was accepted (exit 0 / a return value), or an accepted one gave a bad image;
* ``multi_line``: a refusal whose message is not one line;
* ``kills``: for each write stage (export --force, calibrate --force, build --dry-run) SIGKILLed at three points,
  whether the artifact then verified (and edits exactly as before) or was refused with one line.

Damaging probes work on a private copy of the artifact. ``tests/tools/test_reliability_sweep.py`` runs it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from uniref_deploy.runtime.errors import UnirefError

REFUSE, ACCEPT = "refuse", "accept"
STEPS = 2
SMALL_BUDGET = 64 * 64  # the API probes run here (a 1024^2 reference is a 1 MP, multi-GB VAE encode on CPU)


@dataclass
class Outcome:
    """What one probe did."""

    name: str
    expected: str
    got: str  # "refused" | "accepted" | "traceback"
    detail: str = ""

    @property
    def wrong_exit0(self) -> bool:
        return self.got == "accepted" and self.expected == REFUSE or self.got == "bad-output"


@dataclass
class SweepReport:
    """Counts over all probes."""

    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[dict] = field(default_factory=list)

    def counts(self) -> dict:
        o = self.outcomes
        return {
            "probes": len(o), "cli": sum(x.name.startswith("cli ") for x in o),
            "api": sum(x.name.startswith("api ") for x in o),
            "tracebacks": sum(x.got == "traceback" for x in o),
            "wrong_exit0": sum(x.wrong_exit0 for x in o),
            "multi_line": sum(x.got == "multi-line" for x in o),
            "unexpected_refusals": sum(x.got == "refused" and x.expected == ACCEPT for x in o),
            "kills": len(self.kills), "kills_hit": sum(k["killed"] for k in self.kills),
            "kills_verified": sum(k["state"] == "verified" for k in self.kills),
            "kills_refused_one_line": sum(k["state"] == "refused" for k in self.kills),
            "kills_bad": sum(k["state"] not in ("verified", "refused") for k in self.kills),
        }

    def failures(self) -> list[str]:
        bad = [f"{x.name}: expected {x.expected}, got {x.got} {x.detail}" for x in self.outcomes
               if x.got in ("traceback", "multi-line", "bad-output") or x.wrong_exit0
               or (x.got == "refused" and x.expected == ACCEPT)]
        return bad + [f"kill {k['stage']}@{k['at']}: {k['state']} {k['detail']}" for k in self.kills
                      if k["state"] not in ("verified", "refused")]


# ---- the artifact ----------------------------------------------------------------------------------------------


def build_artifact(out: Path, model_dir: Path | None = None) -> Path:
    """Export the tiny preset to ``out`` (fp32, no validation, external data forced); returns ``out``."""
    from uniref_deploy.export import graph_export
    from uniref_deploy.export.exporter import ExportOptions, export_onnx
    from uniref_deploy.presets import build_preset

    model_dir = model_dir or build_preset("tiny", out.parent / "tiny-model", seed=0)
    saved = graph_export.EXTERNAL_DATA_THRESHOLD
    graph_export.EXTERNAL_DATA_THRESHOLD = 0  # every graph gets a .onnx.data file, as models over 2 GB do
    try:
        export_onnx(model_dir, out, ExportOptions(validate=False, ort_fusions=False))
    finally:
        graph_export.EXTERNAL_DATA_THRESHOLD = saved
    return out


def _copy(art: Path, work: Path, name: str) -> Path:
    dst = work / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(art, dst)
    return dst


# ---- running probes ----------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr); an escaping exception counts as a traceback."""
    from uniref_deploy.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException as exc:  # noqa: BLE001 - that is what the sweep looks for
            return -1, out.getvalue(), err.getvalue() + f"Traceback: {type(exc).__name__}: {exc}"
    return code, out.getvalue(), err.getvalue()


def _cli_outcome(name: str, expected: str, argv: list[str], check: Callable[[], str] | None = None) -> Outcome:
    code, out, err = run_cli(argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if "Traceback" in err or code not in (0, 1, 2):
        return Outcome(name, expected, "traceback", err.strip()[-300:])
    if code == 0:
        problem = check() if check else ""
        return Outcome(name, expected, "bad-output" if problem else "accepted", problem)
    if len(errors) != 1 or len([ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]) != 1:
        return Outcome(name, expected, "multi-line", err.strip()[-300:])
    return Outcome(name, expected, "refused", errors[0][:160])


def _api_outcome(name: str, expected: str, fn: Callable[[], object]) -> Outcome:
    try:
        value = fn()
    except UnirefError as err:
        text = str(err)
        return Outcome(name, expected, "multi-line" if "\n" in text else "refused", text[:160])
    except Exception as err:  # noqa: BLE001
        return Outcome(name, expected, "traceback", f"{type(err).__name__}: {err}"[:300])
    problem = _bad_image(value)
    return Outcome(name, expected, "bad-output" if problem else "accepted", problem)


def _bad_image(value: object) -> str:
    arr = np.asarray(value, dtype=np.float32) if value is not None else None
    if arr is None or arr.size == 0:
        return "empty output"
    if not np.isfinite(arr).all():
        return "non-finite output"
    return ""


# ---- inputs -----------------------------------------------------------------------------------------------------


def make_images(root: Path) -> dict[str, Path]:
    """Good and bad reference files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    paths = {name: root / name for name in ("good.png", "good.jpg", "truncated.png", "empty.png", "text.png",
                                             "wide.png", "tall.png", "gray16.png", "cmyk.jpg", "rgba.png",
                                             "one.png", "folder.png")}
    good.save(paths["good.png"])
    good.save(paths["good.jpg"])
    paths["truncated.png"].write_bytes(paths["good.png"].read_bytes()[:200])
    paths["empty.png"].write_bytes(b"")
    paths["text.png"].write_text("not an image\n")
    Image.new("RGB", (1000, 1)).save(paths["wide.png"])
    Image.new("RGB", (1, 2000)).save(paths["tall.png"])
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(paths["gray16.png"])
    good.convert("CMYK").save(paths["cmyk.jpg"])
    good.convert("RGBA").save(paths["rgba.png"])
    Image.new("RGB", (1, 1)).save(paths["one.png"])
    paths["folder.png"].mkdir(exist_ok=True)
    return paths


def api_probes(pipe, images: dict[str, Path], embeds: np.ndarray) -> list[tuple[str, str, dict]]:
    """(name, expectation, kwargs of ``pipe(...)``)."""
    good = str(images["good.png"])
    base = dict(prompt_embeds=embeds, image=[good], num_inference_steps=STEPS, width=64, height=64, seed=0,
                budget=SMALL_BUDGET, policy="per-image")  # per-image: a 64^2 budget holds no 256^2 reference
    z4 = 4 * pipe.config.latent_channels
    d = pipe.config.text_hidden_size
    cases = [
        ("ok baseline", ACCEPT, {}),
        ("single path string", ACCEPT, {"image": good}),
        ("single PIL image", ACCEPT, {"image": Image.open(good)}),
        ("single array", ACCEPT, {"image": np.zeros((32, 48, 3), np.uint8)}),
        ("tuple of paths", ACCEPT, {"image": (good, good)}),
        ("16-bit gray png", ACCEPT, {"image": [str(images["gray16.png"])]}),
        ("cmyk jpeg", ACCEPT, {"image": [str(images["cmyk.jpg"])]}),
        ("rgba png", ACCEPT, {"image": [str(images["rgba.png"])]}),
        ("1x1 reference", ACCEPT, {"image": [str(images["one.png"])]}),
        ("numpy int seed", ACCEPT, {"seed": np.int64(3)}),
        ("2-D embeds", ACCEPT, {"prompt_embeds": embeds[0]}),
        ("output np", ACCEPT, {"output_type": "np"}),
        ("negative seed", REFUSE, {"seed": -1}),
        ("float seed", REFUSE, {"seed": 1.5}),
        ("huge seed", REFUSE, {"seed": 2**70}),
        ("bool seed", REFUSE, {"seed": True}),
        ("string seed", REFUSE, {"seed": "0"}),
        ("image [123]", REFUSE, {"image": [123]}),
        ("image [None]", REFUSE, {"image": [None]}),
        ("image 123", REFUSE, {"image": 123}),
        ("image dict", REFUSE, {"image": {"a": good}}),
        ("image set", REFUSE, {"image": {good}}),
        ("image bytes", REFUSE, {"image": [b"\x89PNG"]}),
        ("missing file", REFUSE, {"image": [str(images["good.png"]) + ".nope"]}),
        ("folder as image", REFUSE, {"image": [str(images["folder.png"])]}),
        ("truncated png", REFUSE, {"image": [str(images["truncated.png"])]}),
        ("empty file", REFUSE, {"image": [str(images["empty.png"])]}),
        ("text file", REFUSE, {"image": [str(images["text.png"])]}),
        ("NUL in path", REFUSE, {"image": ["a\0b.png"]}),
        ("over-long path", REFUSE, {"image": ["x" * 5000 + ".png"]}),
        ("1000x1 reference", REFUSE, {"image": [str(images["wide.png"])]}),
        ("1x2000 reference", REFUSE, {"image": [str(images["tall.png"])]}),
        ("empty array", REFUSE, {"image": [np.zeros((0, 4, 3), np.uint8)]}),
        ("nan array", REFUSE, {"image": [np.full((8, 8, 3), np.nan, np.float32)]}),
        ("object array", REFUSE, {"image": [np.array([[None]])]}),
        ("5-channel array", REFUSE, {"image": [np.zeros((8, 8, 5), np.uint8)]}),
        ("width 64.5", REFUSE, {"width": 64.5}),
        ("width '64'", REFUSE, {"width": "64"}),
        ("width 0", REFUSE, {"width": 0}),
        ("width -64", REFUSE, {"width": -64}),
        ("height 8", REFUSE, {"height": 8}),
        ("width over budget", REFUSE, {"width": 4096, "height": 4096}),
        ("cfg '4'", REFUSE, {"true_cfg_scale": "4"}),
        ("cfg inf", REFUSE, {"true_cfg_scale": float("inf"), "negative_prompt_embeds": embeds}),
        ("cfg nan", REFUSE, {"true_cfg_scale": float("nan"), "negative_prompt_embeds": embeds}),
        ("cfg None", REFUSE, {"true_cfg_scale": None}),
        ("latents [[0.0]]", REFUSE, {"latents": [[0.0]]}),
        ("latents wrong shape", REFUSE, {"latents": np.zeros((1, 3, z4), np.float32)}),
        ("latents nan", REFUSE, {"latents": np.full((1, 16, z4), np.nan, np.float32)}),
        ("latents string", REFUSE, {"latents": "noise"}),
        ("mask wrong shape", REFUSE, {"prompt_embeds_mask": np.ones((1, 3), bool)}),
        ("mask all false", REFUSE, {"prompt_embeds_mask": np.zeros(embeds.shape[:2], bool)}),
        ("mask without embeds", REFUSE, {"prompt_embeds": None, "prompt": "x", "prompt_embeds_mask": np.ones((1, 4))}),
        ("embeds wrong width", REFUSE, {"prompt_embeds": np.zeros((1, 4, d + 1), np.float32)}),
        ("embeds nan", REFUSE, {"prompt_embeds": np.full((1, 4, d), np.nan, np.float32)}),
        ("embeds empty", REFUSE, {"prompt_embeds": np.zeros((1, 0, d), np.float32)}),
        ("embeds list of str", REFUSE, {"prompt_embeds": ["a", "b"]}),
        ("negative embeds wrong", REFUSE, {"negative_prompt_embeds": np.zeros((2, 4, d), np.float32)}),
        ("prompt and embeds", REFUSE, {"prompt": "x"}),
        ("neither prompt", REFUSE, {"prompt_embeds": None}),
        ("prompt list", REFUSE, {"prompt_embeds": None, "prompt": ["a", "b"]}),
        ("negative prompt int", REFUSE, {"negative_prompt": 5}),
        ("steps 0", REFUSE, {"num_inference_steps": 0}),
        ("steps 2.0", REFUSE, {"num_inference_steps": 2.0}),
        ("steps True", REFUSE, {"num_inference_steps": True}),
        ("policy fancy", REFUSE, {"policy": "fancy"}),
        ("policy list", REFUSE, {"policy": ["self"]}),
        ("policy array", REFUSE, {"policy": np.array(["self", "x"])}),
        ("output_type jpg", REFUSE, {"output_type": "jpg"}),
        ("budget 1536 not compiled", REFUSE, {"budget": 1536}),
        ("budget '1024'", REFUSE, {"budget": "1024"}),
        ("budget -1", REFUSE, {"budget": -1}),
        ("budget 1.5", REFUSE, {"budget": 1.5}),
        ("callback int", REFUSE, {"callback": 3}),
        ("17 references", REFUSE, {"image": [good] * 17, "policy": "self", "budget": 1024}),
        ("no refs no size", REFUSE, {"image": [], "width": None, "height": None}),
    ]
    return [(name, exp, {**base, **kw}) for name, exp, kw in cases]


def cli_probes(art: Path, work: Path, images: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    """(name, expectation, argv) of probes that must be refused before any model runs."""
    good = str(images["good.png"])
    a = str(art)
    afile = work / "a-file"
    afile.write_text("x")
    edit = ["edit", a, "--prompt", "p", "--image", good, "--width", "64", "--height", "64", "--steps", "1"]
    out = str(work / "out.png")
    return [
        ("edit no image file", REFUSE, edit[:4] + ["--image", good + ".nope", "-o", out]),
        ("edit truncated image", REFUSE, edit[:4] + ["--image", str(images["truncated.png"]), "-o", out]),
        ("edit text as image", REFUSE, edit[:4] + ["--image", str(images["text.png"]), "-o", out]),
        ("edit folder as image", REFUSE, edit[:4] + ["--image", str(images["folder.png"]), "-o", out]),
        ("edit 1000x1 image", REFUSE, edit + ["--image", str(images["wide.png"]), "-o", out]),
        ("edit -o under a file", REFUSE, edit + ["-o", str(afile / "out.png")]),
        ("edit -o under a file's folder", REFUSE, edit + ["-o", str(afile / "sub" / "out.png")]),
        ("edit -o a folder", REFUSE, edit + ["-o", str(work)]),
        ("edit -o unknown extension", REFUSE, edit + ["-o", str(work / "out.tiff2")]),
        ("edit -o no extension", REFUSE, edit + ["-o", str(work / "out")]),
        ("edit -o read-only fs", REFUSE, edit + ["-o", "/sys/out.png"]),
        ("edit --steps 0", REFUSE, edit + ["--steps", "0", "-o", out]),
        ("edit --budget 4097", REFUSE, edit + ["--budget", "4097", "-o", out]),
        ("edit --budget 1536 uncompiled", REFUSE, edit + ["--budget", "1536", "-o", out]),
        ("edit --width 10", REFUSE, edit + ["--width", "10", "-o", out]),
        ("edit --width abc", REFUSE, edit + ["--width", "abc", "-o", out]),
        ("edit --cfg nan", REFUSE, edit + ["--negative-prompt", "n", "--cfg", "nan", "-o", out]),
        ("edit --cfg inf", REFUSE, edit + ["--negative-prompt", "n", "--cfg", "inf", "-o", out]),
        ("edit --seed -1", REFUSE, edit + ["--seed", "-1", "-o", out]),
        ("edit --policy x", REFUSE, edit + ["--policy", "x", "-o", out]),
        ("edit --backend x", REFUSE, edit + ["--backend", "x", "-o", out]),
        ("edit --precision fp7", REFUSE, edit + ["--precision", "fp7", "-o", out]),
        ("edit missing model", REFUSE, ["edit", str(work / "nope"), "--prompt", "p", "-o", out]),
        ("edit model is a file", REFUSE, ["edit", str(afile), "--prompt", "p", "-o", out]),
        ("edit no prompt", REFUSE, ["edit", a, "-o", out]),
        ("export --opset 5", REFUSE, ["export", "tiny", "--out", str(work / "x1"), "--opset", "5"]),
        ("export --opset abc", REFUSE, ["export", "tiny", "--out", str(work / "x1"), "--opset", "abc"]),
        ("export --dtypes fp64", REFUSE, ["export", "tiny", "--out", str(work / "x1"), "--dtypes", "fp64"]),
        ("export --budgets 1000", REFUSE, ["export", "tiny", "--out", str(work / "x1"), "--budgets", "1000"]),
        ("export --budgets a,b", REFUSE, ["export", "tiny", "--out", str(work / "x1"), "--budgets", "a,b"]),
        ("export --out under a file", REFUSE, ["export", str(art / "source"), "--out", str(afile / "x")]),
        ("export --out read-only", REFUSE, ["export", str(art / "source"), "--out", "/sys/uniref-art"]),
        ("export artifact as model", REFUSE, ["export", a, "--out", str(work / "x2")]),
        ("export missing model", REFUSE, ["export", str(work / "nope"), "--out", str(work / "x2")]),
        ("calibrate --max-side 128", REFUSE, ["calibrate", a, "--max-side", "128"]),
        ("calibrate --max-side 64", REFUSE, ["calibrate", a, "--max-side", "64"]),
        ("calibrate --samples 0", REFUSE, ["calibrate", a, "--samples", "0"]),
        ("calibrate --steps -1", REFUSE, ["calibrate", a, "--steps", "-1"]),
        ("calibrate missing art", REFUSE, ["calibrate", str(work / "nope")]),
        ("calibrate --images missing", REFUSE, ["calibrate", a, "--images", str(work / "no-images"), "--steps", "0"]),
        ("calibrate read-only art", REFUSE, ["calibrate", "/sys/kernel"]),
        ("build --precision fp7", REFUSE, ["build", a, "--precision", "fp7", "--dry-run"]),
        ("build --budgets 1000", REFUSE, ["build", a, "--budgets", "1000", "--dry-run"]),
        ("build --opt-level 9", REFUSE, ["build", a, "--opt-level", "9", "--dry-run"]),
        ("build --weight-streaming-budget x", REFUSE, ["build", a, "--weight-streaming-budget", "xG", "--dry-run"]),
        ("build missing art", REFUSE, ["build", str(work / "nope")]),
        ("inspect missing", REFUSE, ["inspect", str(work / "nope")]),
        ("inspect a file", REFUSE, ["inspect", str(afile)]),
        ("inspect no manifest", REFUSE, ["inspect", str(work)]),
        ("compile --budgets 7", REFUSE, ["compile", "tiny", "--out", str(work / "x3"), "--budgets", "7"]),
        ("compile --precision fp7", REFUSE, ["compile", "tiny", "--out", str(work / "x3"), "--precision", "fp7"]),
        ("compile not a model", REFUSE, ["compile", str(afile), "--out", str(work / "x3")]),
        ("preset unknown", REFUSE, ["preset", "huge", "--out", str(work / "x4")]),
        ("preset --out under a file", REFUSE, ["preset", "tiny", "--out", str(afile / "x")]),
        ("profile --steps 0", REFUSE, ["profile", a, "--steps", "0"]),
        ("profile --refs x", REFUSE, ["profile", a, "--refs", "x"]),
        ("compare --backends x", REFUSE, ["compare", a, "--backends", "x,y"]),
        ("unknown verb", REFUSE, ["frobnicate"]),
        ("unknown option", REFUSE, ["inspect", a, "--frob"]),
    ]


def _damage(kind: str, art: Path) -> None:
    m = json.loads((art / "manifest.json").read_text())
    dit = next(g for g in m["graphs"] if g["name"] == "dit")
    dec = next(g for g in m["graphs"] if g["name"] == "vae_decoder")
    data, dec_data = art / dit["external_data"], art / dec["external_data"]
    if kind == "flip byte in dit .data":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    elif kind == "zero decoder .data":
        dec_data.write_bytes(bytes(dec_data.stat().st_size))
    elif kind == "truncate dit .data":
        data.write_bytes(data.read_bytes()[:100])
    elif kind == "delete decoder .data":
        dec_data.unlink()
    elif kind == "flip byte in dit .onnx":
        raw = bytearray((art / dit["file"]).read_bytes())
        raw[-10] ^= 0x01
        (art / dit["file"]).write_bytes(bytes(raw))
    elif kind == "delete encoder .onnx":
        (art / next(g for g in m["graphs"] if g["name"] == "vae_encoder")["file"]).unlink()
    elif kind == "swap encoder and decoder":
        enc = next(g for g in m["graphs"] if g["name"] == "vae_encoder")
        tmp = art / "swap"
        os.replace(art / enc["file"], tmp)
        os.replace(art / dec["file"], art / enc["file"])
        os.replace(tmp, art / dec["file"])
    elif kind.startswith("manifest "):
        text = {"manifest []": "[]", "manifest null": "null", "manifest 42": "42", "manifest empty": "",
                "manifest truncated": (art / "manifest.json").read_text()[:300],
                "manifest deep nesting": "[" * 100000,
                "manifest graphs 5": json.dumps({**m, "graphs": 5}),
                "manifest graph is a string": json.dumps({**m, "graphs": ["dit"]}),
                "manifest file is a number": json.dumps({**m, "graphs": [{**dit, "file": 5}]}),
                "manifest schema 99": json.dumps({**m, "schema_version": 99}),
                "manifest no model": json.dumps({k: v for k, v in m.items() if k != "model"}),
                "manifest model transformer empty": json.dumps({**m, "model": {**m["model"], "transformer": {}}}),
                "manifest budgets strings": json.dumps({**m, "budgets": ["a"]}),
                "manifest dtype bad": json.dumps({**m, "graphs": [{**dit, "inputs": [{"name": "x", "dtype": "f",
                                                                                     "shape": [1]}]}]}),
                }.get(kind)
        if kind == "manifest not utf-8":
            (art / "manifest.json").write_bytes(b"\xff\xfe\x00{")
        else:
            (art / "manifest.json").write_text(text)
    else:
        raise ValueError(kind)


DAMAGES = ("flip byte in dit .data", "zero decoder .data", "truncate dit .data", "delete decoder .data",
           "flip byte in dit .onnx", "delete encoder .onnx", "swap encoder and decoder", "manifest []",
           "manifest null", "manifest 42", "manifest empty", "manifest not utf-8", "manifest truncated",
           "manifest deep nesting", "manifest graphs 5", "manifest graph is a string", "manifest file is a number",
           "manifest schema 99", "manifest no model", "manifest model transformer empty", "manifest budgets strings",
           "manifest dtype bad")


def damage_probes(art: Path, work: Path, embeds: np.ndarray, images: dict[str, Path]) -> list[Outcome]:
    """Every damage, refused by the API (load + edit) and by ``inspect --verify`` / ``edit`` in the CLI."""
    from uniref_deploy.runtime.pipeline import Pipeline

    out = []
    for kind in DAMAGES:
        copy = _copy(art, work, "damaged")
        _damage(kind, copy)

        def edit(copy=copy):
            pipe = Pipeline.from_artifacts(copy, load_text_encoder=False)
            return pipe(prompt_embeds=embeds, image=[], num_inference_steps=STEPS, width=64, height=64, seed=0)

        out.append(_api_outcome(f"api damaged: {kind}", REFUSE, edit))
        out.append(_cli_outcome(f"cli inspect --verify, damaged: {kind}", REFUSE, ["inspect", str(copy), "--verify"]))
        out.append(_cli_outcome(f"cli edit, damaged: {kind}", REFUSE,
                                ["edit", str(copy), "--prompt", "p", "--image", str(images["good.png"]),
                                 "-o", str(work / "damaged.png")]))
    return out


# ---- SIGKILL of the write stages ----------------------------------------------------------------------------------


def _stage_argv(stage: str, art: Path) -> list[str]:
    cli = [sys.executable, "-m", "uniref_deploy.tools.cli"]
    if stage == "export":
        return cli + ["export", str(art / "source"), "--out", str(art), "--dtypes", "fp32", "--no-validate",
                      "--no-ort-fusions", "--force"]
    if stage == "calibrate":
        return cli + ["calibrate", str(art), "--samples", "1", "--steps", "1", "--max-side", "256", "--force"]
    return cli + ["build", str(art), "--dry-run", "--json"]


def _after_kill(art: Path, embeds: np.ndarray, images: dict[str, Path], reference: np.ndarray) -> tuple[str, str]:
    """"verified" (inspect --verify passes and an edit equals the pristine one), "refused" (one line) or a fault."""
    from uniref_deploy.runtime.pipeline import Pipeline

    code, _, err = run_cli(["inspect", str(art), "--verify"])
    if "Traceback" in err or code not in (0, 1, 2):
        return "traceback", err[-300:]
    try:
        pipe = Pipeline.from_artifacts(art, load_text_encoder=False)
        got = pipe(prompt_embeds=embeds, image=[], num_inference_steps=STEPS, width=64, height=64, seed=0,
                   output_type="np")  # no reference: a 1024^2-budget reference costs a 1 MP VAE encode
    except UnirefError as e:
        return ("refused", str(e)[:160]) if "\n" not in str(e) else ("multi-line", str(e))
    except Exception as e:  # noqa: BLE001
        return "traceback", f"{type(e).__name__}: {e}"
    if code != 0:
        return "verify-failed-but-ran", err.strip()[:200]
    if not np.allclose(got, reference, atol=1e-5):
        return "wrong-output", f"max diff {np.abs(got - reference).max():.3g}"
    leftovers = [str(p) for p in art.rglob(".uniref-*") if p.name != ".uniref.lock"]
    return "verified", f"{len(leftovers)} leftover temp path(s) before the next write stage"


# Where each write stage is killed: at the first progress line containing the text (early, middle, late), or
# (build --dry-run, which prints nothing until done) at that fraction of the time a full run took.
KILL_POINTS: dict[str, tuple[str | float, ...]] = {
    "export": ("export: loading", "export: vae_encoder fp32", "export: vae_decoder fp32"),
    "calibrate": ("collecting ranges", "per-tensor weights", "accuracy run"),
    "build": (0.2, 0.45, 0.7),
}


def _run_until(argv: list[str], point: str | float) -> tuple[bool, float]:
    """Start ``argv``, SIGKILL it at ``point``; returns (whether the kill hit it, seconds since start)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if isinstance(point, float):
        time.sleep(point)
    else:
        for line in proc.stderr:
            if point in line:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return proc.returncode == -signal.SIGKILL, time.perf_counter() - t0


def kill_probes(art: Path, work: Path, embeds: np.ndarray, images: dict[str, Path],
                reference: np.ndarray) -> list[dict]:
    """SIGKILL each write stage at its three ``KILL_POINTS`` on a fresh copy of ``art``, then check the copy."""
    rows = []
    for stage, points in KILL_POINTS.items():
        full = None
        for point in points:
            copy = _copy(art, work, f"kill-{stage}")
            if isinstance(point, float) and full is None:
                t0 = time.perf_counter()
                subprocess.run(_stage_argv(stage, copy), capture_output=True, check=False)
                full = time.perf_counter() - t0
                copy = _copy(art, work, f"kill-{stage}")
            killed, seconds = _run_until(_stage_argv(stage, copy), point * full if isinstance(point, float) else point)
            state, detail = _after_kill(copy, embeds, images, reference)
            rows.append({"stage": stage, "at": point, "killed": killed, "seconds": round(seconds, 1), "state": state,
                         "detail": detail})
    return rows


# ---- the sweep -----------------------------------------------------------------------------------------------------


def sweep(work: Path, art: Path | None = None, kills: bool = True) -> SweepReport:
    """Run every probe; ``art`` defaults to a freshly built tiny artifact under ``work``."""
    from uniref_deploy.runtime.pipeline import Pipeline

    work.mkdir(parents=True, exist_ok=True)
    if art is None:
        from uniref_deploy.presets import build_preset

        art = work / "art"
        build_artifact(art, build_preset("tiny", art / "source", seed=0))
    images = make_images(work / "images")
    pipe = Pipeline.from_artifacts(art, load_text_encoder=False)
    embeds = np.random.default_rng(1).standard_normal((1, 6, pipe.config.text_hidden_size)).astype(np.float32)
    report = SweepReport()
    for name, expected, kwargs in api_probes(pipe, images, embeds):
        report.outcomes.append(_api_outcome(f"api {name}", expected, lambda kw=kwargs: pipe(**kw)))
    for name, expected, argv in cli_probes(art, work, images):
        report.outcomes.append(_cli_outcome(f"cli {name}", expected, argv))
    report.outcomes += damage_probes(art, work, embeds, images)
    if kills:
        reference = pipe(prompt_embeds=embeds, image=[], num_inference_steps=STEPS, width=64, height=64, seed=0,
                         output_type="np")
        report.kills = kill_probes(art, work, embeds, images, reference)
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    work = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="uniref-sweep-"))
    t0 = time.perf_counter()
    report = sweep(work)
    for line in report.failures():
        print("FAIL", line)
    for k in report.kills:
        print(f"kill {k['stage']:<9} at {k['at']!r:<28} ({k['seconds']:5.1f} s): {k['state']:<9} {k['detail']}")
    print(json.dumps({**report.counts(), "seconds": round(time.perf_counter() - t0, 1)}))
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
