"""`uniref-deploy serve` as a real subprocess on loopback, driven through tritonclient (HTTP and gRPC).

Served edits must match ``Pipeline`` called directly with the same arguments (max abs <= 2/255); bad requests get
Triton error responses carrying the project's one-line message while the server keeps serving and logs no
traceback; SIGINT/SIGTERM stop it with no tritonserver (or backend stub) process left. The repository written by
`uniref-deploy triton-repo` is loaded by the same bundled tritonserver.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")
if __import__("importlib").util.find_spec("pytriton") is None:
    pytest.skip("nvidia-pytriton (the bundled tritonserver) is not installed", allow_module_level=True)

from uniref_deploy.runtime.budget import Budget  # noqa: E402
from uniref_deploy.runtime.errors import MissingDependencyError  # noqa: E402
from uniref_deploy.tools.serving.client import EditClient, EditRequestError  # noqa: E402
from uniref_deploy.tools.serving.interface import MODEL_NAME  # noqa: E402
from uniref_deploy.tools.serving.server import stub_site  # noqa: E402

try:
    stub_site()
except MissingDependencyError as err:  # numpy 2 here and no numpy<2 folder for the stubs (README, Serving)
    pytest.skip(str(err), allow_module_level=True)

pytestmark = pytest.mark.slow

PROMPT = "Put the cat from picture 1 on the sofa."
STEPS = 2
READY_TIMEOUT_S = 600
MAX_REQUEST_MB = 2
CONSOLE_SCRIPT = Path(sys.executable).parent / "uniref-deploy"


def cli() -> list[str]:
    return [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "uniref_deploy.tools.cli"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def descendants(pid: int) -> dict[int, str]:
    """pid -> command name of every live descendant of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text.split("(", 1)[1].rsplit(")", 1)
        names[int(stat.parent.name)] = name
        children.setdefault(int(rest.split()[1]), []).append(int(stat.parent.name))
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out[p] = names.get(p, "?")
        todo += children.get(p, [])
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Served:
    """A running `uniref-deploy serve` subprocess (stderr collected to a file)."""

    def __init__(self, args: list[str], log: Path):
        self.http, self.grpc = free_ports(2)
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [*cli(), "serve", *args, "--host", "127.0.0.1", "--http-port", str(self.http),
                 "--grpc-port", str(self.grpc)], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.triton_pids: dict[int, str] = {}

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def wait_ready(self) -> None:
        client = EditClient(self.http_url, "http", timeout_s=5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}: {self.stderr()[-3000:]}")
            if client.ready():
                client.close()
                self.triton_pids = descendants(self.proc.pid)
                return
            time.sleep(0.5)
        self.kill()
        pytest.fail(f"serve was not ready after {READY_TIMEOUT_S} s: {self.stderr()[-3000:]}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.triton_pids.update(descendants(self.proc.pid))
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tiny_artifacts, tmp_path_factory):
    """`serve` on the tiny artifacts: 2 instances, at most 3 references, 2 MB per request."""
    log = tmp_path_factory.mktemp("serve") / "serve.stderr"
    served = Served([str(tiny_artifacts), "--instances", "2", "--backend", "ort", "--max-references", "3",
                     "--max-request-mb", str(MAX_REQUEST_MB)], log)
    try:
        served.wait_ready()
        yield served
    finally:
        served.kill()


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    from uniref_deploy.runtime.pipeline import Pipeline

    return Pipeline.from_artifacts(tiny_artifacts, backend="ort")


REQUESTS = {
    "0-refs": ([], {"width": 64, "height": 48, "seed": 3}),
    "1-ref": ([png(96, 64, 1)], {"seed": 4, "width": 64, "height": 64}),
    "3-refs-cfg": ([png(64, 64, 2), png(48, 80, 3), png(80, 48, 4)],
                   {"seed": 5, "width": 64, "height": 64, "negative_prompt": "blurry", "true_cfg_scale": 3.0}),
    # an untrained side: read as `--budget 288` (288² pixels, the output size follows), not as 288 pixels
    "1-ref-side-288": ([png(96, 64, 6)], {"seed": 6, "budget": 288}),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", list(REQUESTS))
def test_served_edit_matches_the_pipeline(server, pipe, case, protocol):
    images, options = REQUESTS[case]
    options = {"budget": 1024, **options}
    client = EditClient(server.http_url if protocol == "http" else server.grpc_url, protocol)
    result = client.edit(PROMPT, images, steps=STEPS, **options)
    client.close()

    kwargs = {**options, "budget": Budget.parse(str(options["budget"]))}  # as the CLI reads --budget
    expected = pipe(PROMPT, image=[Image.open(io.BytesIO(b)) for b in images], num_inference_steps=STEPS,
                    **kwargs)
    served = Image.open(io.BytesIO(result.png))
    assert served.format == "PNG" and served.size == expected.size
    diff = np.abs(np.asarray(served, np.int16) - np.asarray(expected, np.int16)).max()
    assert diff <= 2, f"served image differs from Pipeline by {diff}/255"
    assert result.timings["dit_steps"] == STEPS and result.timings["total"] > 0


def _bad(name: str):
    """(inputs builder, expected message) per bad request; the builder takes the tritonclient module."""
    good = png(64, 64, 7)
    if name == "corrupt-image":
        return [good[: len(good) // 2]], {}, "Request image 0 .*cannot be decoded"
    if name == "too-many-references":
        return [good] * 4, {}, "4 reference images, over this server's limit of 3"
    if name == "uncompiled-budget":
        return [good], {"budget": 1536}, "Budget 1536 exceeds the largest budget compiled"
    if name == "over-size-limit":  # garbage: a size check after decoding would report a decode error instead
        return [os.urandom(MAX_REQUEST_MB * 2**20 + 1)], {}, f"over this server's limit of {MAX_REQUEST_MB} MB"
    if name == "unknown-policy":
        return [good], {"policy": "crop"}, "Unknown packing policy 'crop'"
    raise KeyError(name)


@pytest.mark.parametrize("case", ["corrupt-image", "too-many-references", "uncompiled-budget", "over-size-limit",
                                  "unknown-policy"])
def test_bad_request_is_an_error_response_then_the_server_serves(server, case):
    import re

    images, options, message = _bad(case)
    client = EditClient(server.http_url, "http")
    with pytest.raises(EditRequestError) as info:
        client.edit(PROMPT, images, steps=STEPS, width=64, height=64, **options)
    assert re.search(message, str(info.value)), str(info.value)
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)

    result = client.edit(PROMPT, [png(64, 64, 8)], steps=STEPS, width=64, height=64)
    client.close()
    assert Image.open(io.BytesIO(result.png)).size == (64, 64)


def test_missing_prompt_and_wrong_types_are_error_responses(server):
    import tritonclient.grpc as grpcclient

    client = EditClient(server.grpc_url, "grpc")
    with pytest.raises(EditRequestError, match="no 'prompt' input"):
        client.edit(None, [], width=64, height=64)
    with pytest.raises(EditRequestError, match="'prompt' is not valid UTF-8"):
        client.edit(b"\xff\xfeprompt", [], width=64, height=64)
    # a wrong data type is refused by Triton itself (its message names the input and the expected type)
    inputs = client.inputs(PROMPT, [], width=64, height=64)
    steps = grpcclient.InferInput("steps", [1, 1], "FP32")
    steps.set_data_from_numpy(np.array([[2.0]], dtype=np.float32))
    with pytest.raises(Exception, match="(?i)steps.*(TYPE_INT32|INT32)"):
        client.client.infer(MODEL_NAME, [*inputs, steps])
    assert client.edit(PROMPT, [], steps=STEPS, width=64, height=64).png.startswith(b"\x89PNG")
    client.close()


def test_load_test_tool_reports_and_plots(server, tmp_path):
    from uniref_deploy.tools.serving.loadtest import LoadTestOptions, run_load_test, write_report

    report = run_load_test(LoadTestOptions(url=server.grpc_url, protocol="grpc", requests=6, concurrency=2,
                                           steps=STEPS, references=1, server_pid=server.proc.pid, rss_after=2))
    json_path, png_path = write_report(report, tmp_path / "load")
    assert report["failures"] == 0 and report["succeeded"] == 6
    assert report["latency_s"]["p50"] <= report["latency_s"]["p95"] <= report["latency_s"]["p99"]
    assert report["server_rss"]["early_bytes"] > 0 and report["server_rss"]["end_bytes"] > 0
    assert json_path.is_file() and png_path.read_bytes().startswith(b"\x89PNG")


def test_zz_sigint_stops_everything_without_tracebacks(server):
    """Runs last in this module (name): stops the shared server."""
    assert any("tritonserver" in n for n in server.triton_pids.values()), server.triton_pids
    code = server.stop(signal.SIGINT)
    log = server.stderr()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    left = {p: n for p, n in server.triton_pids.items() if alive(p)}
    assert not left, f"processes left after SIGINT: {left}"


def test_sigterm_during_model_load_leaves_nothing(tiny_artifacts, tmp_path):
    """SIGTERM while tritonserver is still loading the model: serve cancels, stops it, exits 0."""
    served = Served([str(tiny_artifacts), "--backend", "ort"], tmp_path / "serve.stderr")
    try:
        deadline = time.monotonic() + 120
        while not any("tritonserver" in n for n in descendants(served.proc.pid).values()):
            assert served.proc.poll() is None and time.monotonic() < deadline, served.stderr()[-3000:]
            time.sleep(0.1)
        code = served.stop(signal.SIGTERM)
    finally:
        served.kill()
    assert code == 0, served.stderr()[-3000:]
    assert "Traceback" not in served.stderr()
    left = {p: n for p, n in served.triton_pids.items() if alive(p)}
    assert not left, f"processes left after SIGTERM: {left}"


def test_triton_repo_loads_in_the_bundled_tritonserver(tiny_artifacts, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from uniref_deploy.tools.cli import main
    from uniref_deploy.tools.serving.server import ServerAddress, TritonServer

    repo = tmp_path / "repo"
    assert main(["triton-repo", str(tiny_artifacts), "--out", str(repo), "--kind", "cpu", "--instances", "1",
                 "--backend", "ort"]) == 0
    config = text_format.Parse((repo / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert main(["triton-repo", str(tiny_artifacts), "--out", str(repo)]) == 2  # exists, no --force

    http, grpc = free_ports(2)
    with TritonServer(repo, ServerAddress("127.0.0.1", http, grpc), tmp_path / "work") as triton:
        triton.wait_ready(MODEL_NAME, READY_TIMEOUT_S)
        client = EditClient(f"127.0.0.1:{http}", "http")
        result = client.edit(PROMPT, [png(64, 64, 9)], steps=STEPS, width=64, height=64)
        client.close()
    assert Image.open(io.BytesIO(result.png)).size == (64, 64)
    assert triton.process.returncode == 0


def test_model_that_cannot_load_fails_fast_with_one_line(tiny_artifacts, tmp_path):
    """--backend trt without TensorRT: Triton marks the model UNAVAILABLE; serve says why and exits 1."""
    from uniref_deploy.runtime._lazy import is_available

    if is_available("tensorrt"):
        pytest.skip("TensorRT is importable here, so the trt backend loads")
    served = Served([str(tiny_artifacts), "--backend", "trt"], tmp_path / "serve.stderr")
    try:
        code = served.proc.wait(timeout=300)
        served.triton_pids = {}
    finally:
        served.kill()
    lines = served.stderr().splitlines()
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: Triton could not load model 'uniref_edit'"), lines
    assert "TensorRT" in lines[0] or "tensorrt" in lines[0]
