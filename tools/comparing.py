"""Cross-backend accuracy: the same inputs through every backend, compared against the FIRST backend listed.

Per layout (one per reference count): the VAE encoder's latent per reference, the DiT velocity for identical
feeds (noise + reference tokens, fixed random prompt embeddings, host RoPE tables), the VAE decoder's image for
one latent; then one end-to-end edit with identical latents and embeddings whose decoded images are compared by
PSNR. Each tensor result is a truthy ``CompareResult`` (runtime/compare.py); tolerances are per tensor with a
default key, like polygraphy's comparator: a name is looked up as ``<layout>/<tensor>``, then ``<tensor>``,
then ``default``. ``rel_max`` (max abs error / max |expected|) is the gated metric; ``image.psnr_db`` is a floor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniref_deploy.runtime import latents as lat
from uniref_deploy.runtime.budget import Budget
from uniref_deploy.runtime.compare import CompareResult, compare, psnr
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.graphs import DIT, VAE_DECODER, VAE_ENCODER
from uniref_deploy.runtime.images import to_model_input
from uniref_deploy.runtime.packing import as_budget, pack_references
from uniref_deploy.tools.profiling import check_backends, load_pipeline, procedural_images

logger = logging.getLogger(__name__)
Say = Callable[[str], None]

DEFAULT_TOLERANCES = {"fp32": {"default": 1e-3, "image.psnr_db": 40.0},
                      "fp16": {"default": 5e-2, "image.psnr_db": 30.0}}
TEXT_TOKENS = 24


@dataclass(frozen=True)
class PsnrResult:
    """End-to-end image agreement; truthy when ``psnr_db >= min_db``."""

    name: str
    psnr_db: float
    min_db: float

    def __bool__(self) -> bool:
        return bool(self.psnr_db >= self.min_db)

    def to_dict(self) -> dict:
        return {"name": self.name, "psnr_db": self.psnr_db, "min_db": self.min_db, "passed": bool(self)}


@dataclass
class CompareReport:
    reference: str
    rows: list[tuple[str, CompareResult | PsnrResult]] = field(default_factory=list)  # (backend, result)

    @property
    def passed(self) -> bool:
        return all(bool(r) for _, r in self.rows)

    @property
    def failures(self) -> list[tuple[str, CompareResult | PsnrResult]]:
        return [(b, r) for b, r in self.rows if not r]

    def to_dict(self) -> dict:
        return {"reference": self.reference, "passed": self.passed,
                "results": [{"backend": b, **r.to_dict()} for b, r in self.rows]}


def tolerance(name: str, tolerances: dict[str, float]) -> float:
    """``<layout>/<tensor>`` -> ``<tensor>`` -> ``default``."""
    for key in (name, name.split("/", 1)[-1]):
        if key in tolerances:
            return tolerances[key]
    return tolerances["default"]


def parse_tolerances(items: Sequence[str], precision: str) -> dict[str, float]:
    """``("1e-4", "dit.velocity=2e-3", "image.psnr_db=35")`` -> tolerance dict over the precision's defaults."""
    tol = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp16"]))
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            tol[name or "default"] = float(value)
        except ValueError as err:
            raise InputError(f"--tolerance '{item}' is not NAME=VALUE or VALUE.",
                             "e.g. --tolerance 1e-3 --tolerance dit.velocity=2e-3") from err
    return tol


def run_compare(art: str | Path, backends: Sequence[str], budget: Budget | int, refs: Sequence[int], steps: int,
                tolerances: dict[str, float], precision: str = "fp32", policy: str = "self",
                width: int | None = None, height: int | None = None, seed: int = 0,
                say: Say = logger.info) -> CompareReport:
    """Compare ``backends[1:]`` against ``backends[0]`` on identical inputs.

    Raises:
        InputError: fewer than two backends.
        MissingDependencyError: trt requested without TensorRT.
    """
    if len(backends) < 2:
        raise InputError(f"--backends needs at least two backends, got {list(backends)}.", "e.g. --backends ort,torch")
    check_backends(backends)
    budget = as_budget(budget)
    art = Path(art)
    pipes = {b: load_pipeline(art, b, precision, load_text_encoder=False) for b in backends}
    ref_name, ref = backends[0], pipes[backends[0]]
    for pipe in pipes.values():
        pipe.check_budget(budget)
    report = CompareReport(ref_name)
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((1, TEXT_TOKENS, ref.config.text_hidden_size)).astype(np.float32)
    mask = np.ones((1, TEXT_TOKENS), dtype=bool)
    z = ref.config.latent_channels

    def check(tag: str, graph: str, feeds: dict, out: str) -> np.ndarray:
        outs = {b: p.backends[graph].infer(feeds)[out] for b, p in pipes.items()}
        name = f"{tag}/{graph}.{out}"
        for b in backends[1:]:
            report.rows.append((b, compare(name, outs[b], outs[ref_name], tolerance(name, tolerances))))
        return outs[ref_name]

    for n in refs:
        images = procedural_images(n, seed + n)
        layout = pack_references([im.size for im in images], budget, policy, width, height)
        tag = f"{n}ref:{layout.num_image_tokens}tok"
        say(f"layout {tag}")
        tokens = []
        for i, (im, slot) in enumerate(zip(images, layout.references, strict=True)):
            feeds = {"image": to_model_input(im, slot.width, slot.height)}
            latent = check(f"{tag}#{i + 1}", VAE_ENCODER, feeds, "latent")
            tokens.append(lat.pack(lat.normalize(latent, ref.latents_mean, ref.latents_std)))
        noise = lat.initial_noise(seed, z, layout.target.latent_h, layout.target.latent_w)
        hidden = np.concatenate([noise, *tokens], axis=1).astype(np.float32)
        static = ref.static_feeds(layout, embeds, mask)
        for t in (0.9, 0.3):
            check(f"{tag}@t{t}", DIT, {**static, "hidden_states": hidden,
                                        "timestep": np.full((1,), t, np.float32)}, "velocity")
        latent = lat.denormalize(lat.unpack(noise * 0.5, layout.target.latent_h, layout.target.latent_w),
                                 ref.latents_mean, ref.latents_std)
        check(tag, VAE_DECODER, {"latent": latent.astype(np.float32)}, "image")

    # end to end: identical latents and embeddings, the largest reference count
    n = max(refs)
    images = procedural_images(n, seed + n)
    outs = {}
    for b, p in pipes.items():
        outs[b] = p(prompt_embeds=embeds, prompt_embeds_mask=mask, image=images, num_inference_steps=steps,
                    budget=budget, policy=policy, width=width, height=height, seed=seed,
                    output_type="np")
    tag = f"{n}ref:{pipes[ref_name].last_layout.num_image_tokens}tok"
    for b in backends[1:]:
        name = f"{tag}/image.psnr_db"
        report.rows.append((b, PsnrResult(name, psnr(outs[b], outs[ref_name]), tolerance(name, tolerances))))
    for p in pipes.values():
        p.close()
    return report


def format_table(report: CompareReport) -> str:
    """One line per result: tensor, backend vs reference, errors, tolerance, status."""
    head = (f"{'tensor':<44} {'backend':<8} {'max_abs':>10} {'rel_max':>10} {'cosine':>10} {'tolerance':>10} "
            f"{'status':>6}")
    lines = [f"reference backend: {report.reference}", head, "-" * len(head)]
    for b, r in report.rows:
        state = "ok" if r else "FAIL"
        if isinstance(r, PsnrResult):
            lines.append(f"{r.name:<44} {b:<8} {'':>10} {f'{r.psnr_db:.2f} dB':>10} {'':>10} "
                         f"{f'>={r.min_db:g} dB':>10} {state:>6}")
        else:
            lines.append(f"{r.name:<44} {b:<8} {r.max_abs:>10.3g} {r.rel_max:>10.3g} {r.cosine:>10.6f} "
                         f"{r.tolerance:>10.3g} {state:>6}")
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures)} of {len(report.rows)})"
    lines.append(verdict)
    return "\n".join(lines)
