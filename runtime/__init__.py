"""The lean runtime: reference packing, RoPE tables, scheduler, backends and the edit pipeline.

Importing this package pulls in numpy and the standard library only; torch, onnxruntime, tensorrt and
transformers are imported lazily by the pieces that need them.
"""

from typing import TYPE_CHECKING

from .errors import (
    BackendError,
    InputError,
    ManifestError,
    MissingDependencyError,
    PackingError,
    UnirefError,
)

if TYPE_CHECKING:  # type checkers see the class; importing the package at run time stays numpy-only
    from .pipeline import Pipeline

__all__ = [
    "BackendError",
    "InputError",
    "ManifestError",
    "MissingDependencyError",
    "PackingError",
    "UnirefError",
    "Pipeline",
]


def __getattr__(name: str):
    # Pipeline pulls in PIL; keep the bare package import as small as possible.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
