"""Run the ``tritonserver`` binary bundled with PyTriton (``nvidia-pytriton``) over a model repository.

PyTriton ships Triton Inference Server, its Python backend and one backend stub per Python version. The stub
embeds the Python it was built for and finds this environment through ``PATH`` (the venv's ``bin`` first) and
``libpythonX.Y.so`` through ``LD_LIBRARY_PATH`` (the running interpreter's ``LIBDIR`` first: a stub that picked up
a different patch release of libpython would run this environment's standard library on the wrong core).

The server runs in its own session (Ctrl-C reaches ``serve``, which stops it in order) and gets SIGKILL if the
process that started it dies, so no ``tritonserver`` outlives ``serve``.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from uniref_deploy.runtime.errors import MissingDependencyError, UnirefError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STUB_SITE_ENV = "UNIREF_TRITON_STUB_SITE"
STUB_TIMEOUT_S = 300


class ServerError(UnirefError):
    """tritonserver failed to start, or exited on its own."""

    exit_code = 1


@dataclass(frozen=True)
class ServerAddress:
    """Where the server listens (loopback by default)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int | None = None  # None: metrics off

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


def bundled_triton() -> Path:
    """PyTriton's ``tritonserver`` folder (``bin/``, ``backends/``, ``python_backend_stubs/``).

    Raises:
        MissingDependencyError: nvidia-pytriton is not installed.
    """
    spec = importlib.util.find_spec("pytriton")  # locate only: importing pytriton is slow and not needed
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("Serving needs Triton Inference Server from nvidia-pytriton.",
                                     "pip install 'uniref-deploy[serve]'.")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(f"nvidia-pytriton has no tritonserver binary under {root}.",
                                     "reinstall it: pip install --force-reinstall nvidia-pytriton.")
    return root


def prepare_backends(workdir: Path, triton: Path | None = None) -> Path:
    """A backend folder for ``--backend-directory``: the Python backend plus this Python's stub."""
    triton = triton or bundled_triton()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependencyError(f"nvidia-pytriton has no Python backend stub for Python {version}.",
                                     "use a Python version it supports (3.8-3.13).")
    backends = workdir / "backends"
    shutil.copytree(triton / "backends", backends, dirs_exist_ok=True)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def stub_site() -> Path | None:
    """A folder holding numpy<2 to put first on the stubs' ``PYTHONPATH``, or None when this numpy is 1.x.

    The Python-backend stub bundled with nvidia-pytriton 0.7 was built against numpy 1.x: under numpy 2 it hands
    BYTES tensors to Python corrupted. The folder is ``$UNIREF_TRITON_STUB_SITE``, else ``<venv>/triton-stub-site``.

    Raises:
        MissingDependencyError: numpy is 2.x here and the folder holds no numpy.
    """
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    site = Path(os.environ.get(STUB_SITE_ENV) or Path(sys.prefix) / "triton-stub-site")
    if not (site / "numpy").is_dir():
        raise MissingDependencyError(
            f"The Triton Python-backend stub bundled with nvidia-pytriton needs numpy<2; this environment has "
            f"numpy {numpy.__version__} and '{site}' holds no numpy.",
            f"pip install --target '{site}' 'numpy<2' (only the stub processes use it), or set {STUB_SITE_ENV}.")
    return site


def stub_env(workdir: Path) -> Path | None:
    """A venv overlay for the stubs with numpy<2 first, then this environment (None when numpy is 1.x here).

    The embedded stub ignores PYTHONPATH and takes its prefix from the first ``python3`` on PATH, so the overlay is
    a venv: ``bin/python3`` (this base interpreter), ``pyvenv.cfg``, and a site-packages holding links to the
    numpy<2 folder and a ``.pth`` that adds this environment's site-packages after it.
    """
    numpy_site = stub_site()
    if numpy_site is None:
        return None
    env = workdir / "stub-env"
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = env / "lib" / pyver / "site-packages"
    packages.mkdir(parents=True, exist_ok=True)
    (env / "bin").mkdir(exist_ok=True)
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    for name in ("python3", pyver):
        (env / "bin" / name).symlink_to(base)
    (env / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                    f"version = {platform.python_version()}\n")
    for entry in numpy_site.iterdir():
        (packages / entry.name).symlink_to(entry.resolve())
    dirs = "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages())
    (packages / "zz_uniref_environment.pth").write_text(f"import site; {dirs}\n")
    return env


def server_env(triton: Path, workdir: Path) -> dict[str, str]:
    """Environment for tritonserver: this venv (or its numpy<2 overlay) first on PATH, this libpython and
    PyTriton's libraries loadable."""
    env = dict(os.environ)
    overlay = stub_env(workdir)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(triton.parent.parent / "nvidia_pytriton.libs"),
            env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    bins = ([str(overlay / "bin")] if overlay else []) + [str(Path(sys.executable).parent), env.get("PATH", "")]
    env["PATH"] = ":".join(p for p in bins if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class TritonServer:
    """One ``tritonserver`` process over ``repository``; use as a context manager or call start/stop.

    Args:
        repository (Path): the model repository.
        address (ServerAddress): host and ports.
        workdir (Path): scratch folder for the backend copy and the server log.
        exit_timeout_s (int): how long in-flight requests may take to finish on stop (default 30).
        log_to_stderr (bool): pass Triton's log through instead of writing ``workdir/tritonserver.log``.
    """

    def __init__(self, repository: Path, address: ServerAddress, workdir: Path, exit_timeout_s: int = 30,
                 log_to_stderr: bool = False):
        self.repository, self.address, self.workdir = Path(repository), address, Path(workdir)
        self.exit_timeout_s = exit_timeout_s
        self.log_to_stderr = log_to_stderr
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    def command(self, backends: Path, triton: Path) -> list[str]:
        a = self.address
        cmd = [str(triton / "bin" / "tritonserver"), f"--model-repository={self.repository}",
               f"--backend-directory={backends}", f"--cache-directory={triton / 'caches'}",
               f"--http-address={a.host}", f"--http-port={a.http_port}",
               f"--grpc-address={a.host}", f"--grpc-port={a.grpc_port}",
               f"--exit-timeout-secs={self.exit_timeout_s}", "--strict-readiness=true",
               # a stub busy on a starved CPU answers health checks late; 30 s (the default) is too tight there
               f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}",
               f"--log-info={str(self.log_to_stderr).lower()}"]
        if a.metrics_port is None:
            cmd.append("--allow-metrics=false")
        else:
            cmd += [f"--metrics-address={a.host}", f"--metrics-port={a.metrics_port}"]
        return cmd

    def start(self) -> TritonServer:
        triton = bundled_triton()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = server_env(triton, self.workdir)  # fails early when the stub would need numpy<2 and has none
        backends = prepare_backends(self.workdir, triton)
        log = None if self.log_to_stderr else open(self.log_path, "wb")  # noqa: SIM115 - closed by the child's exit
        try:
            self.process = subprocess.Popen(self.command(backends, triton), env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if log is not None:
                log.close()
        logger.info("tritonserver pid %d, log %s", self.process.pid, self.log_path)
        return self

    def wait_ready(self, model: str, timeout_s: float = 600.0, cancel: threading.Event | None = None) -> bool:
        """Block until ``model`` is ready (HTTP ``/v2/models/<model>/ready``); False if ``cancel`` was set first.

        Raises:
            ServerError: the server exited or the model was not ready within ``timeout_s``.
        """
        url = f"http://{self.address.http_url}/v2/models/{model}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                return False
            if self.process is None or self.process.poll() is not None:
                reason = self.logged_load_failure(model)
                if reason:
                    raise ServerError(f"Triton could not load model '{model}': {reason}")
                raise ServerError(f"tritonserver exited during startup (code "
                                  f"{None if self.process is None else self.process.returncode}): {self.last_error()}",
                                  "check the ports are free and the artifacts load (`uniref-deploy inspect`).")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            failed = self.load_failure(model)
            if failed:
                self.stop()
                raise ServerError(f"Triton could not load model '{model}': {failed}",
                                  "check the artifact folder with `uniref-deploy inspect` and the backend choice.")
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"Model '{model}' was not ready after {timeout_s:.0f} s: {self.last_error()}")

    def load_failure(self, model: str) -> str | None:
        """The reason Triton gives for ``model`` being UNAVAILABLE (a failed load), else None."""
        req = urllib.request.Request(f"http://{self.address.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                index = json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None
        for entry in index:
            if entry.get("name") == model and entry.get("state") == "UNAVAILABLE" and entry.get("reason"):
                return " ".join(str(entry["reason"]).split())[:500]
        return None

    def stop(self) -> int | None:
        """SIGINT (Triton lets in-flight requests finish), then SIGKILL after the exit timeout; reap the group."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in time; killing it")
                proc.kill()
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # stubs share the server's process group
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return proc.returncode

    def logged_load_failure(self, model: str) -> str | None:
        """The first line of the reason Triton logged for failing to load ``model`` (None if none)."""
        if self.log_to_stderr or not self.log_path.is_file():
            return None
        pattern = re.compile(rf"failed to load '{re.escape(model)}' version \d+: (?:Internal: )?(?:\w+(?:Error|Exception): )?(.*?)(?:\\n|\"?$)")
        for line in self.log_path.read_text(errors="replace").splitlines():
            found = pattern.search(line)
            if found:
                return found.group(1).strip()
        return None

    def last_error(self) -> str:
        """The last error line of the server log (or a pointer to stderr)."""
        if self.log_to_stderr or not self.log_path.is_file():
            return "see tritonserver's messages above"
        lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()]
        return (errors or lines or ["(no log output)"])[-1].strip()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
