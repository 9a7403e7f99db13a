"""Deferred imports of heavy optional libraries (torch, onnxruntime, tensorrt, transformers).

``lazy_import("onnxruntime", extra="onnx")`` returns a proxy; the real import happens on first attribute access and
a missing package raises ``MissingDependencyError`` naming the pip extra that provides it.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from .errors import MissingDependencyError


class _LazyModule(types.ModuleType):
    def __init__(self, name: str, extra: str | None):
        super().__init__(name)
        self.__dict__["_lazy_name"] = name
        self.__dict__["_lazy_extra"] = extra
        self.__dict__["_lazy_module"] = None

    def _load(self) -> types.ModuleType:
        mod = self.__dict__["_lazy_module"]
        if mod is None:
            mod = require(self.__dict__["_lazy_name"], self.__dict__["_lazy_extra"])
            self.__dict__["_lazy_module"] = mod
        return mod

    def __getattr__(self, item: str) -> Any:
        return getattr(self._load(), item)


def require(name: str, extra: str | None = None) -> types.ModuleType:
    """Import ``name`` now, or raise ``MissingDependencyError`` with the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        hint = f"pip install 'uniref-deploy[{extra}]'" if extra else f"pip install {name.split('.')[0]}"
        raise MissingDependencyError(f"'{name}' is required for this feature but cannot be imported ({err}).", hint) from err


def lazy_import(name: str, extra: str | None = None) -> types.ModuleType:
    """Return a proxy module that imports ``name`` on first use."""
    return _LazyModule(name, extra)


def is_available(name: str) -> bool:
    """True when ``name`` can be imported (the import is attempted, not just located)."""
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True
