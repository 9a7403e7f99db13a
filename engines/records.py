"""The build plan's records: axis and shape ranges, optimization profiles, engines, and the plan as JSON.

One ``EnginePlan`` per (graph, precision) holds one ``ProfilePlan`` per compiled bucket, in bucket order, so the
profile index TensorRT reports is the position in ``EnginePlan.profiles``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from uniref_deploy.runtime.artifacts import ENGINE_DIR, ENGINE_PLAN
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.errors import InputError, ManifestError
from uniref_deploy.runtime.fileio import sha256_json
from uniref_deploy.runtime.text import MAX_TEXT_TOKENS

if TYPE_CHECKING:
    from .memory import MemoryPlan

PLAN_SCHEMA_VERSION = 2
PLAN_FILE = ENGINE_PLAN
TIMING_CACHE_FILE = f"{ENGINE_DIR}/timing.cache"
MAX_OPT_LEVEL = 5


@dataclass(frozen=True)
class AxisRange:
    """min/opt/max of one named dynamic axis."""

    min: int
    opt: int
    max: int

    def holds(self, size: int) -> bool:
        return self.min <= size <= self.max


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shapes of one input, as in a TensorRT optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def holds(self, shape: Sequence[int]) -> bool:
        shape = tuple(shape)
        return len(shape) == len(self.min) and all(
            lo <= n <= hi for lo, n, hi in zip(self.min, shape, self.max, strict=True)
        )

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: Mapping) -> ShapeRange:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class ProfilePlan:
    """One optimization profile (one bucket): input name -> ``ShapeRange``, plus the axis ranges behind it."""

    budget: Budget
    shapes: tuple[tuple[str, ShapeRange], ...]
    axes: tuple[tuple[str, AxisRange], ...] = ()

    def __getitem__(self, name: str) -> ShapeRange:
        for key, shape in self.shapes:
            if key == name:
                return shape
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shapes)

    def axis(self, name: str) -> AxisRange:
        return dict(self.axes)[name]

    def holds(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """True when every profiled input's shape in ``shapes`` lies within its range."""
        return all(rng.holds(shapes[name]) for name, rng in self.shapes)

    def to_dict(self) -> dict:
        return {
            "budget": self.budget.pixels,
            "shapes": {name: rng.to_dict() for name, rng in self.shapes},
            "axes": {name: dataclasses.asdict(rng) for name, rng in self.axes},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ProfilePlan:
        return cls(
            Budget.from_pixels(int(d["budget"])),
            tuple((name, ShapeRange.from_dict(r)) for name, r in d["shapes"].items()),
            tuple((name, AxisRange(**r)) for name, r in d.get("axes", {}).items()),
        )


@dataclass(frozen=True)
class PlanOptions:
    """Settings shared by every engine of a plan.

    Args:
        builder_optimization_level (int, default 3): TensorRT builder optimization level, 0..5.
        refittable (bool, default False): build refittable engines (weights can be swapped later).
        weight_streaming_budget (int | None, default None): bytes of DiT weights kept on the GPU; set to build
            weight-streamable DiT engines (the budget is applied when the runtime loads them).
        cfg_batch (bool, default False): plan for batched true CFG (DiT batch opt 2 instead of 1).
        max_aspect (int, default 8): the widest reference/target aspect (A:1) the VAE profiles cover.
        opt_text_tokens (int, default 256): text length the DiT profiles are tuned for.
        timing_cache (str, default "engines/timing.cache"): timing cache file shared by all builds.
        vae_tile (int | None, default None): the runtime's VAE tile side in pixels (manifest); VAE profile sides
            are capped at it. None: untiled, the sides follow the references and targets.

    Raises:
        InputError: a value out of range.
    """

    builder_optimization_level: int = 3
    refittable: bool = False
    weight_streaming_budget: int | None = None
    cfg_batch: bool = False
    max_aspect: int = 8
    opt_text_tokens: int = 256
    timing_cache: str = TIMING_CACHE_FILE
    vae_tile: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.builder_optimization_level <= MAX_OPT_LEVEL:
            raise InputError(
                f"builder_optimization_level {self.builder_optimization_level} is out of range.",
                f"use 0..{MAX_OPT_LEVEL} (TensorRT's default is 3).",
            )
        if self.weight_streaming_budget is not None and self.weight_streaming_budget < 0:
            raise InputError(f"weight_streaming_budget must be >= 0 bytes, got {self.weight_streaming_budget}.")
        if self.max_aspect < 1:
            raise InputError(f"max_aspect must be >= 1, got {self.max_aspect}.")
        if not 1 <= self.opt_text_tokens <= MAX_TEXT_TOKENS:
            raise InputError(f"opt_text_tokens must be in 1..{MAX_TEXT_TOKENS}, got {self.opt_text_tokens}.")


@dataclass(frozen=True)
class EnginePlan:
    """One TensorRT plan to build: one graph at one precision, one profile per bucket. Paths are relative to
    the artifact folder."""

    graph: str
    precision: str
    onnx_file: str
    onnx_sha256: str
    engine_file: str
    profiles: tuple[ProfilePlan, ...]
    builder_optimization_level: int = 3
    strongly_typed: bool = True
    refittable: bool = False
    weight_streaming_budget: int | None = None
    timing_cache: str = TIMING_CACHE_FILE

    @property
    def name(self) -> str:
        return f"{self.graph}.{self.precision}"

    @property
    def budgets(self) -> tuple[Budget, ...]:
        """The bucket of each profile, in profile-index order."""
        return tuple(p.budget for p in self.profiles)

    @property
    def weight_streaming(self) -> bool:
        return self.weight_streaming_budget is not None

    def settings_sha256(self) -> str:
        """Hash of everything that shapes the engine (ONNX content, profiles, flags); not the cache path."""
        d = self.to_dict()
        d.pop("timing_cache")
        return sha256_json(d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["profiles"] = [p.to_dict() for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EnginePlan:
        d = dict(d)
        d["profiles"] = tuple(ProfilePlan.from_dict(p) for p in d["profiles"])
        return cls(**d)


@dataclass(frozen=True)
class SkippedEngine:
    """An engine the plan could not include, and why."""

    graph: str
    precision: str
    reason: str

    @property
    def name(self) -> str:
        return f"{self.graph}.{self.precision}"


@dataclass(frozen=True)
class BuildPlan:
    """Every engine to build, the shared timing cache, what was skipped, the options used and, when a GPU size
    was given, the memory plan (``memory.py``)."""

    engines: tuple[EnginePlan, ...]
    timing_cache_file: str = TIMING_CACHE_FILE
    skipped: tuple[SkippedEngine, ...] = ()
    options: PlanOptions = field(default_factory=PlanOptions)
    memory: MemoryPlan | None = None

    def engine(self, name: str) -> EnginePlan:
        for e in self.engines:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "schema_version": PLAN_SCHEMA_VERSION,
                "timing_cache_file": self.timing_cache_file,
                "options": dataclasses.asdict(self.options),
                "engines": [e.to_dict() for e in self.engines],
                "skipped": [dataclasses.asdict(s) for s in self.skipped],
                **({"memory": self.memory.to_dict()} if self.memory is not None else {}),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> BuildPlan:
        """Parse ``to_json`` output.

        Raises:
            ManifestError: not a build plan, or written by another schema version.
        """
        from .memory import MemoryPlan

        try:
            d = json.loads(text)
            if d.get("schema_version") != PLAN_SCHEMA_VERSION:
                raise ManifestError(
                    f"Build plan schema {d.get('schema_version')!r} is not supported (this build reads "
                    f"{PLAN_SCHEMA_VERSION}).",
                    "re-run `uniref-deploy build --dry-run` to write a new plan.",
                )
            return cls(
                engines=tuple(EnginePlan.from_dict(e) for e in d["engines"]),
                timing_cache_file=d["timing_cache_file"],
                skipped=tuple(SkippedEngine(**s) for s in d.get("skipped", ())),
                options=PlanOptions(**d.get("options", {})),
                memory=MemoryPlan.from_dict(d["memory"]) if "memory" in d else None,
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"Build plan is malformed ({err}).", "re-run `uniref-deploy build --dry-run`.") from err
