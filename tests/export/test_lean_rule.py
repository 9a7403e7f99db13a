"""Tests for export/lean_rule.py: when ``export`` goes memory-lean on its own, and that it says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from uniref_deploy.export.lean_rule import LEAN_RAM_FRACTION, choose_lean, dit_fp32_bytes, physical_ram_bytes


def _checkpoint(root: Path, shape: tuple[int, int]) -> Path:
    """A transformer folder holding one bf16 tensor of ``shape`` (header and zero bytes only)."""
    tdir = root / "transformer"
    tdir.mkdir(parents=True)
    (tdir / "config.json").write_text("{}")
    nbytes = int(np.prod(shape)) * 2
    header = json.dumps({"w": {"dtype": "BF16", "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    (tdir / "diffusion_pytorch_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                                               + bytes(nbytes))
    return root


def test_fp32_size_comes_from_the_headers(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path, (100, 30))
    assert dit_fp32_bytes(model) == 100 * 30 * 4
    assert dit_fp32_bytes(tmp_path / "nothing") == 0  # no safetensors: the regular export decides
    assert physical_ram_bytes() > 0


@pytest.mark.parametrize(("ram", "lean"), [(10 * 12_000, False), (10 * 12_000 // 2, False), (4 * 12_000 - 1, True)])
def test_auto_choice_against_the_ram_fraction(tmp_path: Path, ram: int, lean: bool) -> None:
    model = _checkpoint(tmp_path, (100, 30))  # 12,000 bytes in fp32
    said: list[str] = []
    assert LEAN_RAM_FRACTION == 0.25
    assert choose_lean(model, None, said.append, ram_bytes=ram) is lean
    assert bool(said) is lean and (not said or "memory-lean" in said[0] and "--no-lean" in said[0])


def test_an_explicit_choice_wins(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path, (100, 30))
    said: list[str] = []
    assert choose_lean(model, False, said.append, ram_bytes=1) is False
    assert choose_lean(model, True, said.append, ram_bytes=10**12) is True
    assert not said
