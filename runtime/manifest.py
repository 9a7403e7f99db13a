"""The artifact manifest: the one contract between compile stages and the runtime.

``ART/manifest.json`` holds the schema version, the model configuration, the compiled budgets, every graph
(file, sha256, inputs/outputs with dtypes and dynamic axes, precision), engines and one ``StageRecord`` per stage.
Stages pass ``Manifest`` objects (frozen dataclasses), never raw dicts; all schema checks live here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import Budget
from .errors import InputError, ManifestError, UnirefError
from .fileio import atomic_write_text, sha256_file
from .model_checks import check_transformer_config, resolve_pipeline_class
from .pipeline_classes import EDIT_PLUS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: one engine per precision (budgets in pixels), text_encoder_dir relative to the artifact folder
MANIFEST_NAME = "manifest.json"
TEXT_ENCODER_DTYPES = ("auto", "bfloat16", "float32")
DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "int64", "int32", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; a string in ``shape`` names a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ManifestError(f"Tensor '{self.name}' has unknown dtype '{self.dtype}'.", f"use one of {DTYPES}.")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


ORT_VARIANT = "ort"  # GraphSpec.variant of a graph rewritten with ONNX Runtime contrib ops (export/ort_fusions.py)


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph (``dit``, ``vae_encoder``, ``vae_decoder``) at one precision.

    ``variant`` is "" for the portable graph (plain ONNX ops: TensorRT and every runtime) or "ort" for a copy
    rewritten with ONNX Runtime contrib-op fusions (``export/ort_fusions.py``), which only ONNX Runtime loads.
    """

    name: str
    precision: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None
    info: dict = field(default_factory=dict)
    variant: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}.{self.precision}" + (f".{self.variant}" if self.variant else "")

    @property
    def validated(self) -> bool:
        """True when the export's checks of this graph ran and passed (``info["smoke"]``, ``info["validation"]``)."""
        checks = [self.info[k].get("passed") for k in ("smoke", "validation") if isinstance(self.info.get(k), dict)]
        return bool(checks) and all(c is True for c in checks)

    @property
    def files(self) -> tuple[tuple[str, str | None], ...]:
        """``(relative path, recorded sha256)`` of the graph and of its external data file, if any."""
        graph = ((self.file, self.sha256),)
        return graph + (((self.external_data, self.info.get("external_data_sha256")),) if self.external_data else ())

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        paths = [d["file"], d["sha256"]] + ([d["external_data"]] if d.get("external_data") is not None else [])
        if not all(isinstance(p, str) for p in paths):
            raise TypeError(f"graph file, sha256 and external_data must be strings, got {paths}")
        return cls(
            name=d["name"],
            precision=d["precision"],
            file=d["file"],
            sha256=d["sha256"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            external_data=d.get("external_data"),
            info=dict(d.get("info", {})),
            variant=d.get("variant", ""),
        )


@dataclass(frozen=True)
class EngineSpec:
    """One TensorRT plan: one graph at one precision with one optimization profile per bucket, and provenance.

    ``budgets`` are pixel counts; ``budgets[i]`` is the bucket of optimization profile ``i``.
    """

    graph: str
    precision: str
    file: str
    sha256: str
    budgets: tuple[int, ...]
    provenance: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.graph}.{self.precision}"

    @classmethod
    def from_dict(cls, d: dict) -> EngineSpec:
        return cls(d["graph"], d["precision"], d["file"], d["sha256"], tuple(int(b) for b in d["budgets"]),
                   dict(d.get("provenance", {})))


def _migrate_engines(records: list[dict]) -> list[dict]:
    """Drop engine records of the one-engine-per-bucket layout (a ``budget`` key, no ``budgets``): those plans
    hold one profile each and are replaced by one engine per precision; ``uniref-deploy build`` rebuilds them."""
    kept = [r for r in records if "budget" not in r or "budgets" in r]
    if len(kept) < len(records):
        logger.warning("dropped %d per-bucket TensorRT engine record(s) of an older layout; re-run "
                       "`uniref-deploy build` for one engine per precision", len(records) - len(kept))
    return kept


@dataclass(frozen=True)
class StageRecord:
    """What a stage did: its settings, the hash of its inputs (for skip-on-rerun), time and results."""

    stage: str
    inputs_sha256: str
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    tool_versions: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> StageRecord:
        return cls(
            d["stage"], d["inputs_sha256"], dict(d.get("settings", {})), float(d.get("seconds", 0.0)),
            dict(d.get("tool_versions", {})), dict(d.get("results", {})),
        )


@dataclass(frozen=True)
class ModelConfig:
    """What the runtime needs to know about the model, independent of where its weights live.

    Args:
        family: DiT family adapter name ("qwen-image").
        transformer: the diffusers transformer config (in_channels, axes_dims_rope, zero_cond_t, ...).
        vae: z_dim, latents_mean, latents_std, temperal_downsample.
        scheduler: the scheduler_config.json values.
        text_encoder_dir: folder with text_encoder/, tokenizer/, processor/ (a diffusers model dir), or None.
        pipeline_class: the diffusers pipeline class the model is served as (``runtime/pipeline_classes.py``).
        text_encoder_dtype: the text encoder's torch dtype: "auto" (bf16 where supported), "bfloat16", "float32".
    """

    family: str
    transformer: dict
    vae: dict
    scheduler: dict
    text_encoder_dir: str | None = None
    pipeline_class: str = EDIT_PLUS
    text_encoder_dtype: str = "auto"

    @property
    def latent_channels(self) -> int:
        return int(self.vae["z_dim"])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.get("temperal_downsample", [False, True, True]))

    @property
    def text_hidden_size(self) -> int:
        return int(self.transformer["joint_attention_dim"])

    @property
    def zero_cond_t(self) -> bool:
        return bool(self.transformer.get("zero_cond_t", False))

    @classmethod
    def from_diffusers_dir(cls, model_dir: str | os.PathLike, pipeline_class: str | None = None,
                           text_encoder_dtype: str = "auto") -> ModelConfig:
        """Read a diffusers-format folder's JSON configs (no weights, no torch) and check the model is servable.

        Args:
            model_dir: the folder with ``model_index.json``.
            pipeline_class: serve the model as this class (a key of ``PIPELINE_CLASSES``) whatever its
                ``model_index.json`` says; None reads ``_class_name`` (an unknown edit class loads as Edit-Plus,
                with a warning).
            text_encoder_dtype: recorded as ``text_encoder_dtype`` ("auto", "bfloat16" or "float32").

        Raises:
            ManifestError: not a diffusers folder, or unreadable configs.
            InputError: a pipeline class, transformer config or text-encoder dtype this runtime cannot serve.
        """
        if text_encoder_dtype not in TEXT_ENCODER_DTYPES:
            raise InputError(f"Unknown text-encoder dtype '{text_encoder_dtype}'.",
                             f"use one of {', '.join(TEXT_ENCODER_DTYPES)}.")
        root = Path(model_dir)
        index = root / "model_index.json"
        if not index.is_file():
            raise ManifestError(
                f"'{root}' is not a diffusers model folder (no model_index.json).",
                "pass a folder written by `uniref-deploy preset` or a diffusers checkpoint, or an artifact folder.",
            )
        try:
            model_index = json.loads(index.read_text())
            transformer = json.loads((root / "transformer" / "config.json").read_text())
            vae = json.loads((root / "vae" / "config.json").read_text())
            scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ManifestError(f"Cannot read the configs of '{root}': {err}.", "is the checkpoint complete?") from err
        served = resolve_pipeline_class(root, model_index, pipeline_class)
        check_transformer_config(root, transformer, vae)
        vae_keep = {k: vae[k] for k in ("z_dim", "latents_mean", "latents_std", "temperal_downsample") if k in vae}
        has_text = (root / "text_encoder").is_dir() and (root / "processor").is_dir()
        return cls("qwen-image", _strip_private(transformer), vae_keep, _strip_private(scheduler),
                   str(root.resolve()) if has_text else None, served, text_encoder_dtype)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(d["family"], dict(d["transformer"]), dict(d["vae"]), dict(d["scheduler"]), d.get("text_encoder_dir"),
                   d.get("pipeline_class", EDIT_PLUS), d.get("text_encoder_dtype", "auto"))


def _strip_private(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@dataclass(frozen=True)
class Manifest:
    """The artifact directory's contents; immutable, updated with ``replace``-style helpers."""

    model: ModelConfig
    budgets: tuple[Budget, ...] = ()
    graphs: tuple[GraphSpec, ...] = ()
    engines: tuple[EngineSpec, ...] = ()
    stages: tuple[StageRecord, ...] = ()
    schema_version: int = SCHEMA_VERSION
    #: the exported prompt encoder's host files: {"dir", "files": {rel: sha256}, "vision_max_patches",
    #: "max_text_len"} (TEXT_CONTRACT.md); None: prompts go through transformers
    text: dict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(Budget.coerce(b) for b in self.budgets))

    @property
    def largest_budget(self) -> Budget | None:
        """The largest compiled budget (None when none was recorded)."""
        return max(self.budgets, default=None)

    # ---- lookups -------------------------------------------------------------------------------------------
    def graph(self, name: str, precision: str = "fp32", variant: str = "") -> GraphSpec:
        for g in self.graphs:
            if g.name == name and g.precision == precision and g.variant == variant:
                return g
        have = sorted(g.key for g in self.graphs) or ["none"]
        raise ManifestError(
            f"The artifacts have no '{name}' graph at precision '{precision}' (have: {', '.join(have)}).",
            f"re-run `uniref-deploy export` with --dtypes including {precision}, or pick another precision.",
        )

    def has_graph(self, name: str, precision: str, variant: str = "") -> bool:
        return any(g.name == name and g.precision == precision and g.variant == variant for g in self.graphs)

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.stage == name), None)

    # ---- updates -------------------------------------------------------------------------------------------
    def with_graph(self, graph: GraphSpec) -> Manifest:
        kept = tuple(g for g in self.graphs if g.key != graph.key)
        return dataclasses.replace(self, graphs=(*kept, graph))

    def without_graph(self, key: str) -> Manifest:
        """The manifest without the graph whose ``key`` is given (unchanged when absent)."""
        return dataclasses.replace(self, graphs=tuple(g for g in self.graphs if g.key != key))

    def with_engine(self, engine: EngineSpec) -> Manifest:
        kept = tuple(e for e in self.engines if e.file != engine.file)
        return dataclasses.replace(self, engines=(*kept, engine))

    def with_stage(self, record: StageRecord) -> Manifest:
        kept = tuple(s for s in self.stages if s.stage != record.stage)
        return dataclasses.replace(self, stages=(*kept, record))

    def with_text(self, text: dict | None) -> Manifest:
        """Record (or with None, drop) the exported prompt encoder's host files."""
        return dataclasses.replace(self, text=text)

    def with_budgets(self, budgets: tuple[Budget | int, ...]) -> Manifest:
        """Record ``budgets`` (an int is a pixel count or a trained side, as in ``Budget.coerce``)."""
        return dataclasses.replace(self, budgets=tuple(sorted({Budget.coerce(b) for b in budgets})))

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["budgets"] = [b.pixels for b in self.budgets]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        """A manifest from its JSON dict; older schema versions are upgraded first (:func:`migrate`)."""
        d = migrate(d)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"Manifest schema version {version!r} is not supported (this build reads {SCHEMA_VERSION}).",
                "re-run `uniref-deploy export` with this version of uniref-deploy.",
            )
        try:
            return cls(
                model=ModelConfig.from_dict(d["model"]),
                budgets=tuple(Budget.from_pixels(int(b)) for b in d.get("budgets", ())),
                graphs=tuple(GraphSpec.from_dict(g) for g in d.get("graphs", ())),
                engines=tuple(EngineSpec.from_dict(e) for e in d.get("engines", ())),
                stages=tuple(StageRecord.from_dict(s) for s in d.get("stages", ())),
                schema_version=version,
                text=dict(d["text"]) if d.get("text") else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ManifestError(f"Manifest is malformed: missing or bad field {err}.", "re-run the export.") from err
        except UnirefError as err:
            raise ManifestError(f"Manifest is malformed: {err.message}", "re-run the export.") from err

    @classmethod
    def load(cls, art_dir: str | os.PathLike) -> Manifest:
        path = Path(art_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(
                f"'{art_dir}' has no {MANIFEST_NAME}.",
                "pass an artifact folder written by `uniref-deploy export` or `compile`.",
            )
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as err:
            raise ManifestError(f"Cannot read '{path}': {err.strerror or err}.", "check its permissions.") from err
        except UnicodeDecodeError as err:
            raise ManifestError(f"'{path}' is not UTF-8 text ({err.reason} at byte {err.start}).",
                                "the file is damaged; re-run the export.") from err
        except (json.JSONDecodeError, RecursionError) as err:
            raise ManifestError(f"'{path}' is not valid JSON ({err}).", "the file is damaged; re-run the export.") from err
        if not isinstance(data, dict):
            raise ManifestError(f"'{path}' holds a JSON {type(data).__name__}, not an object.",
                                "the file is damaged; re-run the export.")
        return cls.from_dict(data).with_text_encoder_dir(_absolute(art_dir, data))

    def save(self, art_dir: str | os.PathLike) -> Path:
        """Write ``manifest.json`` atomically; ``text_encoder_dir`` is stored relative to ``art_dir``."""
        path = Path(art_dir) / MANIFEST_NAME
        saved = self.with_text_encoder_dir(_relative(art_dir, self.model.text_encoder_dir))
        atomic_write_text(path, saved.to_json() + "\n")
        return path

    def file_status(self, art_dir: str | os.PathLike, names: tuple[str, ...] | None = None,
                    engines: bool = False) -> list[tuple[str, str]]:
        """``(relative path, "ok" | "damaged" | "missing")`` of every graph file and external data file (of the
        graphs whose ``key`` is in ``names``, default all), and of every engine when ``engines`` is set.

        Files are hashed streamed; one without a recorded sha256 counts as damaged (it cannot be trusted).
        """
        root = Path(art_dir)
        files = [f for g in self.graphs if names is None or g.key in names for f in g.files]
        if self.text and names is None:
            files += list(self.text.get("files", {}).items())
        if engines:
            files += [(e.file, e.sha256) for e in self.engines]
        return [(rel, _status(root / rel, sha)) for rel, sha in files]

    def with_text_encoder_dir(self, folder: str | None) -> Manifest:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, text_encoder_dir=folder))

    def verify_files(self, art_dir: str | os.PathLike, names: tuple[str, ...] | None = None) -> None:
        """Check that each graph file and its external data exist and match their recorded sha256.

        Raises:
            ManifestError: a file is missing or its content changed since it was recorded.
        """
        for g in self.graphs:
            if names is None or g.key in names:
                verify_graph(art_dir, g)
        if self.text and names is None:
            for rel, sha in self.text.get("files", {}).items():
                if _status(Path(art_dir) / rel, sha) != "ok":
                    raise ManifestError(f"Text-encoder file '{Path(art_dir) / rel}' is missing or does not match "
                                        "the sha256 recorded in the manifest.", "re-run `uniref-deploy export`.")


def verify_graph(art_dir: str | os.PathLike, graph: GraphSpec) -> None:
    """Check that ``graph``'s file and external data under ``art_dir`` exist and match their recorded sha256.

    Raises:
        ManifestError: a file is missing, damaged or replaced.
    """
    for rel, sha in graph.files:
        f = Path(art_dir) / rel
        status = _status(f, sha)
        if status == "missing":
            raise ManifestError(f"Graph file '{f}' listed in the manifest is missing.", "re-run the export.")
        if status != "ok":
            raise ManifestError(
                f"Graph file '{f}' does not match the sha256 recorded in the manifest (damaged or replaced).",
                "re-run `uniref-deploy export` to regenerate it.",
            )


def _status(path: Path, sha256: str | None) -> str:
    if not path.is_file():
        return "missing"
    try:
        return "ok" if sha256 and sha256_file(path) == sha256 else "damaged"
    except OSError:
        return "damaged"


# ---- paths of the source model ----------------------------------------------------------------------------------


def _relative(art_dir: str | os.PathLike, folder: str | None) -> str | None:
    """``folder`` relative to ``art_dir`` (POSIX separators), so the two can move together."""
    if not folder or not Path(folder).is_absolute():
        return folder  # already relative to the artifact folder
    return Path(os.path.relpath(Path(folder).resolve(), Path(art_dir).resolve())).as_posix()


def _absolute(art_dir: str | os.PathLike, data: dict) -> str | None:
    """The stored ``text_encoder_dir`` resolved against ``art_dir`` (absolute paths of v1 manifests stay)."""
    folder = (data.get("model") or {}).get("text_encoder_dir")
    return str((Path(art_dir) / folder).resolve()) if folder else folder


# ---- schema migrations --------------------------------------------------------------------------------------------


def _v1_to_v2(d: dict) -> dict:
    """v1 engine records were one plan per bucket (``budget``, a side); v2 has one plan per precision with a
    profile per bucket (``budgets``, pixels). Per-bucket records are dropped (``_migrate_engines``); paths stay:
    ``Manifest.load`` resolves a v1 absolute ``text_encoder_dir`` as it is."""
    return {**d, "engines": _migrate_engines(list(d.get("engines", ()))), "schema_version": 2}


MIGRATIONS = {1: _v1_to_v2}  # version -> step to version + 1


def migrate(d: dict) -> dict:
    """Upgrade a manifest dict of an older schema version, one step at a time, up to ``SCHEMA_VERSION``."""
    version = d.get("schema_version")
    while isinstance(version, int) and version < SCHEMA_VERSION and version in MIGRATIONS:
        d = MIGRATIONS[version](d)
        version = d.get("schema_version")
    return d
