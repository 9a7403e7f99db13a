"""Where each stage writes inside an artifact folder (paths relative to ``ART``; the manifest is ``manifest.json``).

Every stage and tool reads these names from here, so a report is never looked for where it was not written.
"""

from __future__ import annotations

REPORT_DIR = "reports"
VALIDATION_REPORT = f"{REPORT_DIR}/export_validation.json"  # export: graphs vs torch on ONNX Runtime
TRT_LINT_REPORT = f"{REPORT_DIR}/trt_lint.json"  # export: what TensorRT would refuse
PROFILE_DIR = f"{REPORT_DIR}/profile"  # `uniref-deploy profile`: profile.json, profile.md, plots

CALIBRATION_DIR = "calibration"
CALIBRATION_REPORT = f"{CALIBRATION_DIR}/report.json"  # FP8 vs fp32 accuracy (+ report.png)
CALIBRATION_PLOT = f"{CALIBRATION_DIR}/report.png"
CALIBRATION_RANGES = f"{CALIBRATION_DIR}/ranges.json"  # activation scales of the quantised layers
CALIBRATION_INT8_REPORT = f"{CALIBRATION_DIR}/int8_report.json"  # INT8 modes (static, SmoothQuant, dynamic) vs fp32

ENGINE_DIR = "engines"
ENGINE_PLAN = f"{ENGINE_DIR}/plan.json"  # the engine plan (written even where TensorRT is absent)
