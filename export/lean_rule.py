"""When the export goes memory-lean: the DiT's fp32 size against this machine's RAM.

The regular export holds the DiT in fp32 (4 bytes per parameter, whatever the checkpoint's dtype) and, while
writing the ONNX file, a second copy of the weights, plus activations for validation. It is chosen only while the
fp32 DiT stays under ``LEAN_RAM_FRACTION`` of physical RAM (two copies and the rest then fit in about half);
above that, ``export`` streams the checkpoint instead (export/lean.py) and says so. The same bound decides
whether the smoke validation can run the DiT graph itself or a depth-reduced twin of it (export/exporter.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

from uniref_deploy.runtime.errors import ExportError

from .lean import checkpoint_index, transformer_dir

LEAN_RAM_FRACTION = 0.25
GIB = 1024**3


def physical_ram_bytes() -> int:
    """Total physical memory of this machine (0 when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def dit_fp32_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of the checkpoint's DiT in fp32, from the safetensors headers (0 for a non-safetensors checkpoint)."""
    try:
        index = checkpoint_index(transformer_dir(Path(model_dir)))
    except ExportError:
        return 0
    return 4 * sum(math.prod(e.shape) for e in index.values())


def exceeds_ram_fraction(model_dir: str | os.PathLike, ram_bytes: int | None = None) -> bool:
    """Whether the checkpoint's fp32 DiT exceeds ``LEAN_RAM_FRACTION`` of RAM (then ONNX Runtime's CPU provider,
    which holds fp16 weights as fp32 copies too, cannot hold the whole graph either)."""
    ram = physical_ram_bytes() if ram_bytes is None else ram_bytes
    return bool(ram) and dit_fp32_bytes(model_dir) > LEAN_RAM_FRACTION * ram


def choose_lean(model_dir: str | os.PathLike, requested: bool | None, say: Callable[[str], None],
                ram_bytes: int | None = None) -> bool:
    """``requested`` when given; otherwise lean exactly when the fp32 DiT exceeds ``LEAN_RAM_FRACTION`` of RAM."""
    if requested is not None:
        return requested
    need, ram = dit_fp32_bytes(model_dir), physical_ram_bytes() if ram_bytes is None else ram_bytes
    if ram and need > LEAN_RAM_FRACTION * ram:
        say(f"export: the DiT is {need / GIB:.1f} GiB in fp32, more than {LEAN_RAM_FRACTION:.0%} of this machine's "
            f"{ram / GIB:.1f} GiB RAM: using the memory-lean export (--no-lean forces the regular one)")
        return True
    return False
