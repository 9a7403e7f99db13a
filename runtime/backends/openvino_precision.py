"""Per-graph inference precision for OpenVINO, chosen by measured accuracy and recorded in the manifest.

bf16 halves the DiT's CPU time where the CPU has native bf16, but a graph's error in bf16 depends on its
weights and activations (the ``small`` preset's random VAE is unusable in bf16). So each graph runs once in f32
and once in bf16 on a small, realistic probe (noise latents, a packed reference, host RoPE tables); bf16 is kept
where its output stays within ``BF16_TOLERANCE`` of f32. The result is the manifest's ``openvino`` stage record,
keyed by the graphs' sha256, the OpenVINO version and the device, so it is measured once per artifact and machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .. import latents as lat
from ..compare import compare
from ..cpu import cpu_features
from ..fileio import sha256_json
from ..graphs import DIT, GRAPH_NAMES, VAE_DECODER, VAE_ENCODER
from ..manifest import Manifest, ModelConfig, StageRecord
from ..packing import pack_references
from ..rope import RopeCache, RopeConfig, modulation_index
from .openvino import OpenVinoBackend, _ov, native_bf16
from .openvino_islands import RULE_VERSION as ISLAND_RULE_VERSION

logger = logging.getLogger(__name__)

STAGE = "openvino"
# bf16 is accepted for a graph when, on the probe, max|bf16 - f32| / max|f32| <= rel_max and cosine >= cosine.
# bf16 keeps 8 significant bits (relative rounding 2^-9); a sound graph stays near 1e-2 after accumulation.
BF16_TOLERANCE = {"rel_max": 5e-2, "cosine": 0.999}
PROBE_SIDE = 256  # pixels: 256 target + 256 reference tokens for the DiT, a 256² image for the VAE encoder
PROBE_TEXT_TOKENS = 16


def probe_feeds(name: str, config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Small representative feeds of graph ``name`` (deterministic for ``seed``)."""
    rng = np.random.default_rng(seed)
    z = config.latent_channels
    side = PROBE_SIDE // config.vae_scale_factor
    if name == VAE_ENCODER:
        ramp = np.linspace(-1.0, 1.0, PROBE_SIDE, dtype=np.float32)
        image = ramp[None, None, :, None] * ramp[None, None, None, :] + 0.2 * rng.standard_normal(
            (1, 3, PROBE_SIDE, PROBE_SIDE)).astype(np.float32)
        return {"image": np.clip(image, -1.0, 1.0).astype(np.float32)}
    mean = np.asarray(config.vae["latents_mean"], np.float32)
    std = np.asarray(config.vae["latents_std"], np.float32)
    if name == VAE_DECODER:
        noise = rng.standard_normal((1, z, side, side)).astype(np.float32)
        return {"latent": lat.denormalize(noise * 0.5, mean, std).astype(np.float32)}
    layout = pack_references([(PROBE_SIDE, PROBE_SIDE)], PROBE_SIDE * PROBE_SIDE, "self", PROBE_SIDE, PROBE_SIDE)
    tokens = layout.num_image_tokens
    feeds = {
        "hidden_states": rng.standard_normal((1, tokens, 4 * z)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((1, PROBE_TEXT_TOKENS, config.text_hidden_size)).astype(np.float32),
        "encoder_hidden_states_mask": np.ones((1, PROBE_TEXT_TOKENS), dtype=bool),
        "timestep": np.full((1,), 0.5, np.float32),
        **RopeCache(RopeConfig.from_transformer_config(config.transformer)).tables(layout.grids, PROBE_TEXT_TOKENS),
    }
    if config.zero_cond_t:
        feeds["modulate_index"] = modulation_index(layout.grids)
    return feeds


def record_key(manifest: Manifest, device: str) -> str:
    """What the measurement depends on: the graphs' content, OpenVINO's version and the device."""
    graphs = {g.key: g.sha256 for g in manifest.graphs if g.name in GRAPH_NAMES and g.precision == "fp32"
              and not g.variant}
    return sha256_json({"graphs": graphs, "openvino": _ov().__version__, "device": device,
                        "tolerance": BF16_TOLERANCE, "f32_islands": ISLAND_RULE_VERSION})


def measure_precisions(manifest: Manifest, art_dir: str | Path, threads: int | None = None, device: str = "CPU",
                       cache_dir: Path | None = None) -> StageRecord:
    """Run every portable fp32 graph in f32 and bf16 on its probe; bf16 where it stays within tolerance."""
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for name in GRAPH_NAMES:
        graph = manifest.graph(name, "fp32")
        feeds = probe_feeds(name, manifest.model)
        outs = {}
        for hint in ("fp32", "bf16"):
            backend = OpenVinoBackend(graph, art_dir, hint, threads=threads, cache_dir=cache_dir, device=device)
            with backend:
                outs[hint] = backend.infer(feeds)[graph.outputs[0].name]
        res = compare(f"{name}.{graph.outputs[0].name}", outs["bf16"], outs["fp32"], BF16_TOLERANCE["rel_max"])
        ok = bool(res) and res.cosine >= BF16_TOLERANCE["cosine"]
        results[name] = {"precision": "bf16" if ok else "fp32", "bf16_rel_max": res.rel_max,
                         "bf16_cosine": res.cosine}
        logger.info("openvino %s: bf16 rel_max %.3g cosine %.6f -> %s", name, res.rel_max, res.cosine,
                    results[name]["precision"])
    return StageRecord(
        stage=STAGE, inputs_sha256=record_key(manifest, device),
        settings={"device": device, "tolerance": BF16_TOLERANCE, "probe_side": PROBE_SIDE},
        seconds=round(time.perf_counter() - start, 2), tool_versions={"openvino": _ov().__version__},
        results={"cpu": cpu_features().to_dict(), "graphs": results},
    )


def graph_precisions(manifest: Manifest, art_dir: str | Path, precision: str | None, threads: int | None = None,
                     device: str = "CPU", cache_dir: Path | None = None) -> dict[str, str]:
    """OpenVINO inference precision ("fp32"/"bf16") per graph name for the factory's ``precision`` argument.

    Measures and records the per-graph choice (``measure_precisions``) the first time it is needed on a CPU
    with native bf16; the manifest is re-saved with the record when the folder is writable.
    """
    if precision == "fp32":
        return dict.fromkeys(GRAPH_NAMES, "fp32")
    if not native_bf16(device):
        if precision == "bf16":
            logger.warning("this %s has no native bf16 (AMX / AVX-512 BF16): running the DiT in f32", device)
        return dict.fromkeys(GRAPH_NAMES, "fp32")
    record = manifest.stage(STAGE)
    if record is None or record.inputs_sha256 != record_key(manifest, device):
        record = measure_precisions(manifest, art_dir, threads=threads, device=device, cache_dir=cache_dir)
        _save_record(art_dir, record)
    chosen = {name: record.results["graphs"][name]["precision"] for name in GRAPH_NAMES}
    if precision == "bf16":
        chosen[DIT] = "bf16"
    return chosen


def _save_record(art_dir: str | Path, record: StageRecord) -> None:
    """Add ``record`` to the manifest under the artifact folder's write lock; skipped (with a warning) when the
    folder is read-only or a write stage holds the lock, so a reader never blocks or races a writer."""
    from ..errors import UnirefError
    from ..locking import artifact_lock

    try:
        with artifact_lock(art_dir, "openvino-precision", cleanup=False):
            Manifest.load(art_dir).with_stage(record).save(art_dir)
    except (OSError, UnirefError) as err:
        logger.warning("cannot record the OpenVINO precision choice in %s (%s); it is measured again next start",
                       art_dir, err)
