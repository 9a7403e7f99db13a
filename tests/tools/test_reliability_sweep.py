"""The scripted sweep of issue 12 (``tools/reliability_sweep.py``): over 100 bad inputs through the CLI and the
API give no traceback and no exit-0 wrong output, and every write stage SIGKILLed at three points leaves an
artifact that verifies (and edits as before) or is refused with one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from uniref_deploy.tools.reliability_sweep import sweep  # noqa: E402

pytestmark = pytest.mark.slow  # several minutes on 2 cores: the SIGKILL part reruns export and calibrate


def test_sweep_counts(tiny_external_artifacts: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(tiny_external_artifacts, art)
    report = sweep(tmp_path / "work", art)
    counts = report.counts()
    assert counts["probes"] >= 100 and counts["cli"] >= 40 and counts["api"] >= 40
    assert report.failures() == []
    assert (counts["tracebacks"], counts["wrong_exit0"], counts["multi_line"], counts["kills_bad"]) == (0, 0, 0, 0)
    assert counts["kills"] == 9 and {k["stage"] for k in report.kills} == {"export", "calibrate", "build"}
    # export and calibrate die at their progress lines; build --dry-run may finish before a late timed kill
    assert all(k["killed"] for k in report.kills if k["stage"] != "build")
