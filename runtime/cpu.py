"""What the host CPU offers for low-precision inference (read from ``/proc/cpuinfo``; empty elsewhere).

Recorded with benchmark figures and with the OpenVINO precision choice, so a number can be tied to the
hardware it was measured on: AMX (bf16/int8 tiles), AVX-512 BF16 (bf16 dot products), AVX-512 VNNI (int8).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU model name, its logical core count and which of ``FLAGS`` it has."""

    model: str
    cores: int
    flags: tuple[str, ...]

    @property
    def native_bf16(self) -> bool:
        """AMX or AVX-512 BF16: bf16 matmuls run in hardware, not emulated."""
        return "amx_bf16" in self.flags or "avx512_bf16" in self.flags

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    def to_dict(self) -> dict:
        return {**asdict(self), "native_bf16": self.native_bf16, "amx": self.amx}


def cpu_features(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> CpuFeatures:
    """Parse ``cpuinfo`` (Linux format); unknown fields stay empty on other systems."""
    path = Path(cpuinfo)
    text = path.read_text(errors="replace") if path.is_file() else ""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuFeatures(model or "unknown", os.cpu_count() or 1, tuple(f for f in FLAGS if f in flags))


def available_memory_bytes(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of ``meminfo`` (Linux format) in bytes, or None where it is unknown."""
    path = Path(meminfo)
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "MemAvailable":
            parts = value.split()
            return int(parts[0]) * 1024 if parts and parts[0].isdigit() else None
    return None
