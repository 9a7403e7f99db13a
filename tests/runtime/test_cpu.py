"""Host facts read from /proc files (given fake copies): CPU features and free memory."""

from __future__ import annotations

from pathlib import Path

from uniref_deploy.runtime.cpu import available_memory_bytes, cpu_features


def test_cpu_features_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    feats = cpu_features(info)
    assert feats.model == "Test CPU" and feats.native_bf16 and feats.amx
    assert feats.flags == ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def test_available_memory_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory_bytes(meminfo) == 20000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")
    assert available_memory_bytes(meminfo) is None
    assert available_memory_bytes(tmp_path / "absent") is None
