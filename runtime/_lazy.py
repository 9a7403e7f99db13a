"""Deferred imports of heavy optional libraries (torch, onnxruntime, tensorrt, transformers).

Modules call ``require("onnxruntime", extra="onnx")`` inside the function that needs the library, so importing
the runtime stays light; a missing package raises ``MissingDependencyError`` naming the pip extra that provides it.
"""

from __future__ import annotations

import importlib
import types

from .errors import MissingDependencyError


def require(name: str, extra: str | None = None) -> types.ModuleType:
    """Import ``name`` now, or raise ``MissingDependencyError`` with the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        hint = f"pip install 'uniref-deploy[{extra}]'" if extra else f"pip install {name.split('.')[0]}"
        raise MissingDependencyError(f"'{name}' is required for this feature but cannot be imported ({err}).", hint) from err


def is_available(name: str) -> bool:
    """True when ``name`` can be imported (the import is attempted, not just located)."""
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True
