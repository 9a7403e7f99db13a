"""Tests for the engine build plan (``engines/plan.py``, ``ranges.py``, ``records.py``, ``render.py``) and the
``build`` verb, on CPU.

The profile ranges are checked three ways: exact values per bucket, coverage (random profiled requests packed by
``runtime.packing`` fit every profile) and tightness (each end of each range is reached by a legal request).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shlex

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from uniref_deploy.engines.plan import make_plan
from uniref_deploy.engines.ranges import (
    axis_ranges,
    image_token_range,
    input_shapes,
    reference_side_range,
    target_side_range,
)
from uniref_deploy.engines.records import PLAN_FILE, BuildPlan, PlanOptions
from uniref_deploy.engines.render import format_table, polygraphy_command, polygraphy_commands
from uniref_deploy.runtime._lazy import is_available
from uniref_deploy.runtime.budget import TRAINED_SIDES, Budget
from uniref_deploy.runtime.errors import InputError, ManifestError, PackingError
from uniref_deploy.runtime.graphs import graph_io
from uniref_deploy.runtime.manifest import GraphSpec, Manifest, ModelConfig, TensorSpec
from uniref_deploy.runtime.packing import max_references, pack_references, target_size
from uniref_deploy.runtime.text import MAX_TEXT_TOKENS
from uniref_deploy.tools.cli import main

SIDES = TRAINED_SIDES
B = {side: Budget.from_side(side) for side in SIDES}
# longest reference side / target side per bucket at aspects up to 8:1 (see the module docstring of plan.py)
LONGEST = {1024: (2912, 2912), 1536: (4320, 4336), 2048: (5792, 5808)}


def _config(zero_cond_t: bool = False) -> ModelConfig:
    transformer = {"in_channels": 64, "out_channels": 16, "patch_size": 2, "axes_dims_rope": [16, 56, 56],
                   "joint_attention_dim": 3584, "zero_cond_t": zero_cond_t}
    vae = {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16,
           "temperal_downsample": [False, True, True]}
    return ModelConfig("qwen-image", transformer, vae, {})


def _graph(name: str, precision: str, config: ModelConfig) -> GraphSpec:
    inputs, outputs = graph_io(name, config)
    sha = hashlib.sha256(f"{name}.{precision}".encode()).hexdigest()
    return GraphSpec(name, precision, f"onnx/{name}.{precision}.onnx", sha, inputs, outputs)


def _manifest(zero_cond_t: bool = False, budgets=(1024, 1536, 2048)) -> Manifest:
    config = _config(zero_cond_t)
    graphs = [_graph("dit", "fp32", config), _graph("dit", "fp16", config), _graph("vae_encoder", "fp32", config),
              _graph("vae_decoder", "fp32", config), _graph("vae_decoder", "fp16", config)]
    return Manifest(config, budgets=tuple(b * b for b in budgets), graphs=tuple(graphs))  # stored as pixels


def _profile(plan: BuildPlan, engine: str, side: int):
    """The profile of bucket ``side`` in ``engine``."""
    return next(p for p in plan.engine(engine).profiles if p.budget == B[side])


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return _manifest()


@pytest.fixture(scope="module")
def full_plan(manifest) -> BuildPlan:
    return make_plan(manifest, SIDES, ("fp16",))


# --- engines, files, skips ---------------------------------------------------------------------------------


def test_one_engine_per_graph_and_precision_with_a_profile_per_bucket(manifest):
    plan = make_plan(manifest, (2048, 1024), ("fp16", "fp32", "fp8"))
    assert [e.name for e in plan.engines] == ["dit.fp16", "dit.fp32", "vae_encoder.fp32", "vae_decoder.fp16"]
    assert all(e.budgets == (B[1024], B[2048]) for e in plan.engines)  # profile order = bucket order
    dit = plan.engine("dit.fp16")
    assert dit.engine_file == "engines/dit.fp16.plan"
    assert (dit.onnx_file, dit.onnx_sha256) == ("onnx/dit.fp16.onnx", manifest.graph("dit", "fp16").sha256)
    assert dit.strongly_typed and dit.builder_optimization_level == 3 and not dit.refittable
    assert [(s.graph, s.precision) for s in plan.skipped] == [("dit", "fp8")]
    assert "calibrate" in plan.skipped[0].reason


def _int8(manifest: Manifest, mode: str, variant: str = "") -> GraphSpec:
    g = _graph("dit", "int8", manifest.model)
    file = g.file.replace(".onnx", f".{variant}.onnx") if variant else g.file
    return dataclasses.replace(g, file=file, sha256=hashlib.sha256(file.encode()).hexdigest(),
                               info={"activation_mode": mode}, variant=variant)


def test_int8_engine_is_built_from_the_static_qdq_graph(manifest):
    dynamic, qdq = _int8(manifest, "dynamic"), _int8(manifest, "static", "qdq")
    # a dynamic CPU graph alone: TensorRT cannot take it, the engine is skipped with what to run
    plan = make_plan(manifest.with_graph(dynamic), (1024,), ("fp16", "int8"))
    assert [s.name for s in plan.skipped] == ["dit.int8"] and "--precision int8" in plan.skipped[0].reason
    # beside it, the static Q/DQ variant: the int8 engine reads that file
    plan = make_plan(manifest.with_graph(dynamic).with_graph(qdq), (1024,), ("fp16", "int8"))
    engine = plan.engine("dit.int8")
    assert (engine.onnx_file, engine.onnx_sha256) == (qdq.file, qdq.sha256)
    assert engine.engine_file == "engines/dit.int8.plan" and not plan.skipped
    # a static dit.int8 is itself the Q/DQ graph
    static = _int8(manifest, "static")
    assert make_plan(manifest.with_graph(static), (1024,), ("int8",)).engine("dit.int8").onnx_file == static.file


def test_three_budgets_give_one_dit_engine_per_precision_with_three_profiles(manifest):
    plan = make_plan(manifest, SIDES, ("fp16", "fp32"))
    dits = [e for e in plan.engines if e.graph == "dit"]
    assert [e.precision for e in dits] == ["fp16", "fp32"]
    for e in plan.engines:
        assert [p.budget.side for p in e.profiles] == list(SIDES)
        assert [p.axis(next(iter(dict(p.axes)))).max for p in e.profiles] == sorted(
            p.axis(next(iter(dict(p.axes)))).max for p in e.profiles)


def test_missing_bf16_and_vae_are_skipped_with_reasons():
    config = _config()
    m = Manifest(config, budgets=(1024,), graphs=(_graph("dit", "fp16", config),))
    plan = make_plan(m, (1024,), ("bf16", "fp16"))
    assert [e.name for e in plan.engines] == ["dit.fp16"]
    reasons = {f"{s.graph}.{s.precision}": s.reason for s in plan.skipped}
    assert "--dtypes including bf16" in reasons["dit.bf16"]
    assert "vae_encoder" in reasons["vae_encoder.fp16"]


@pytest.mark.parametrize("budgets, precisions, match", [
    ((1024,), ("int4",), "Unknown precision"),
    ((1000,), ("fp16",), "not a trained budget"),
    ((1024 * 1000,), ("fp16",), "not a trained budget"),
    ((), ("fp16",), "No budgets"),
])
def test_bad_requests(manifest, budgets, precisions, match):
    with pytest.raises(InputError, match=match):
        make_plan(manifest, budgets, precisions)


def test_budget_must_be_exported():
    with pytest.raises(InputError, match="not among these artifacts' budgets"):
        make_plan(_manifest(budgets=(1024,)), (2048,), ("fp16",))
    # pixel counts are accepted too; a manifest without budgets allows any trained one
    assert make_plan(_manifest(budgets=()), (2048 * 2048,), ("fp16",)).engines[0].budgets == (B[2048],)
    assert make_plan(_manifest(budgets=()), (B[1536],), ("fp16",)).engines[0].budgets == (B[1536],)


@pytest.mark.parametrize("kwargs", [{"builder_optimization_level": 6}, {"weight_streaming_budget": -1},
                                    {"max_aspect": 0}, {"opt_text_tokens": 2000}])
def test_option_validation(kwargs):
    with pytest.raises(InputError):
        PlanOptions(**kwargs)


def test_unknown_dynamic_axis_is_a_manifest_error():
    config = _config()
    g = _graph("dit", "fp16", config)
    odd = GraphSpec("dit", "fp16", g.file, g.sha256, (*g.inputs, TensorSpec("extra", "float32", ("frames", 4))),
                    g.outputs)
    with pytest.raises(ManifestError, match="'frames'"):
        make_plan(Manifest(config, budgets=(1024,), graphs=(odd,)), (1024,), ("fp16",))


def test_weight_streaming_is_dit_only(manifest):
    plan = make_plan(manifest, (1024,), ("fp16",), PlanOptions(weight_streaming_budget=1 << 30, refittable=True))
    streaming = {e.graph: e.weight_streaming_budget for e in plan.engines}
    assert streaming == {"dit": 1 << 30, "vae_encoder": None, "vae_decoder": None}
    assert all(e.refittable for e in plan.engines)


# --- profiles: exact values --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_dit_profile(full_plan, side):
    prof = _profile(full_plan, "dit.fp16", side)
    n = 2 * side * side // 256  # 8192 / 18432 / 32768
    assert prof["hidden_states"].min == (1, 1, 64)
    assert prof["hidden_states"].opt == (1, n, 64)
    assert prof["hidden_states"].max == (2, n, 64)
    assert (prof["encoder_hidden_states"].min, prof["encoder_hidden_states"].opt,
            prof["encoder_hidden_states"].max) == ((1, 1, 3584), (1, 256, 3584), (2, MAX_TEXT_TOKENS, 3584))
    assert prof["encoder_hidden_states_mask"].max == (2, MAX_TEXT_TOKENS)
    assert (prof["timestep"].min, prof["timestep"].opt, prof["timestep"].max) == ((1,), (1,), (2,))
    for table in ("img_cos", "img_sin"):
        assert (prof[table].min, prof[table].max) == ((1, 64), (n, 64))
    for table in ("txt_cos", "txt_sin"):
        assert (prof[table].min, prof[table].opt, prof[table].max) == ((1, 64), (256, 64), (MAX_TEXT_TOKENS, 64))
    assert dict(prof.axes).keys() == {"batch", "img_tokens", "txt_tokens"}


def test_dit_profile_options():
    plan = make_plan(_manifest(zero_cond_t=True), (1024,), ("fp16",), PlanOptions(cfg_batch=True, opt_text_tokens=128))
    prof = plan.engine("dit.fp16").profiles[0]
    assert prof["modulate_index"].max == (8192,)
    assert prof["hidden_states"].opt == (2, 8192, 64)
    assert prof["encoder_hidden_states"].opt == (2, 128, 3584)


@pytest.mark.parametrize("side", SIDES)
def test_vae_profiles(full_plan, side):
    ref_max, tgt_max = LONGEST[side]
    enc = _profile(full_plan, "vae_encoder.fp32", side)["image"]
    assert (enc.min, enc.opt, enc.max) == ((1, 3, 32, 32), (1, 3, side, side), (1, 3, ref_max, ref_max))
    dec = _profile(full_plan, "vae_decoder.fp16", side)["latent"]
    lat = tgt_max // 8
    assert (dec.min, dec.opt, dec.max) == ((1, 16, 2, 2), (1, 16, side // 8, side // 8), (1, 16, lat, lat))


def test_max_aspect_narrows_the_vae_boxes():
    assert reference_side_range(B[1024], 4).max == 2048
    assert target_side_range(B[1024], 4).max == 2048
    assert reference_side_range(B[1024], 1).max == 1024


# --- profiles: coverage ------------------------------------------------------------------------------------


def _sizes(max_side: int = 6000):
    """(w, h) with aspect within 1:8..8:1."""
    return st.integers(1, max_side).flatmap(lambda h: st.tuples(st.integers(max(1, -(-h // 8)), 8 * h), st.just(h)))


@st.composite
def profiled_requests(draw):
    side = draw(st.sampled_from(SIDES))
    pixels = side * side
    refs = draw(st.lists(_sizes(), max_size=max_references(side)))
    policy = draw(st.sampled_from(("self", "proportional")))
    mode = draw(st.sampled_from(("default", "both", "width", "height") if refs else ("both",)))
    width = height = None
    if mode == "both":
        short = draw(st.integers(1, side // 16)) * 16
        long_ = draw(st.integers(short // 16, min(8 * short, pixels // short) // 16)) * 16
        width, height = (long_, short) if draw(st.booleans()) else (short, long_)
    elif mode == "width":
        width = draw(st.integers(1, 8 * side // 16)) * 16
    elif mode == "height":
        height = draw(st.integers(1, 8 * side // 16)) * 16
    try:
        layout = pack_references(refs, side, policy=policy, width=width, height=height)
    except PackingError:
        assume(False)
    return side, layout, draw(st.integers(1, MAX_TEXT_TOKENS)), draw(st.sampled_from((1, 2)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(profiled_requests())
def test_every_profiled_request_fits_its_bucket(full_plan, request_):
    side, layout, text_tokens, batch = request_
    dit = _profile(full_plan, "dit.fp16", side)
    dit_in, _ = graph_io("dit", _config())
    axes = {"batch": batch, "img_tokens": layout.num_image_tokens, "txt_tokens": text_tokens}
    assert dit.holds(input_shapes(dit_in, axes)), axes
    enc_in, _ = graph_io("vae_encoder", _config())
    enc = _profile(full_plan, "vae_encoder.fp32", side)
    for ref in layout.references:
        assert enc.holds(input_shapes(enc_in, {"batch": 1, "height": ref.height, "width": ref.width})), ref
    dec_in, _ = graph_io("vae_decoder", _config())
    dec = _profile(full_plan, "vae_decoder.fp16", side)
    t = layout.target
    assert dec.holds(input_shapes(dec_in, {"batch": 1, "latent_height": t.latent_h, "latent_width": t.latent_w})), t


@pytest.mark.parametrize("side", SIDES)
def test_single_reference_scan_stays_inside(side):
    """Every aspect on a 1/1000 grid from 1:8 to 8:1: the reference and default target never pass the max."""
    ref_max, tgt_max = reference_side_range(B[side]).max, target_side_range(B[side]).max
    longest_ref = longest_tgt = 0
    for w in range(125, 8001, 3):
        for size in ((w, 1000), (1000, w)):
            for policy in ("self", "proportional"):
                layout = pack_references([size], side, policy=policy)
                longest_ref = max(longest_ref, layout.references[0].width, layout.references[0].height)
                longest_tgt = max(longest_tgt, layout.target.width, layout.target.height)
    assert longest_ref == ref_max  # reached, never passed
    assert longest_tgt <= tgt_max


@pytest.mark.parametrize("side", SIDES)
def test_given_side_scan_stays_inside(side):
    tgt_max, longest = target_side_range(B[side]).max, 0
    for given_side in range(16, 8 * side + 1, 16):
        for ratio in ((8, 1), (79, 10), (7, 1), (4, 1), (1, 1)):
            with contextlib.suppress(PackingError):
                longest = max(longest, *target_size([ratio], side, width=given_side))
            with contextlib.suppress(PackingError):
                longest = max(longest, *target_size([ratio[::-1]], side, height=given_side))
    assert longest <= tgt_max  # reached at 1536 and 2048; at 1024 the default target is longer


# --- profiles: tightness (each end reached by a legal request) ---------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_ranges_are_tight(side):
    pixels = side * side
    tokens = image_token_range(B[side])
    assert pack_references([], side, width=16, height=16).num_image_tokens == tokens.min == 1
    full = pack_references([(side, side)], side)
    assert full.num_target_tokens == full.num_reference_tokens == pixels // 256
    assert full.num_image_tokens == tokens.max == tokens.opt == 2 * pixels // 256

    ref = reference_side_range(B[side])
    assert pack_references([(side, side), (1, 1)], side, policy="proportional").references[1].width == ref.min == 32
    assert pack_references([(8, 1)], side).references[0].width == ref.max
    assert pack_references([(3, 3)], side).references[0].width == ref.opt == side

    tgt = target_side_range(B[side])
    assert pack_references([], side, width=16, height=16).target.width == tgt.min == 16
    reached = max(max(target_size([(8, 1)], side)), *(
        max(target_size([(8, 1)], side, width=w)) for w in range(tgt.max, tgt.max - 160, -16)
        if _legal(lambda w=w: target_size([(8, 1)], side, width=w))))
    assert reached == tgt.max

    dit = axis_ranges("dit", B[side], PlanOptions())
    assert (dit["txt_tokens"].min, dit["txt_tokens"].max) == (1, MAX_TEXT_TOKENS)


def _legal(call) -> bool:
    try:
        call()
    except PackingError:
        return False
    return True


def test_a_wider_aspect_leaves_the_profile():
    """The VAE boxes stop at 8:1; a 9:1 reference is outside (the TensorRT backend would refuse it)."""
    assert pack_references([(9, 1)], 1024).references[0].width > reference_side_range(B[1024]).max


def test_per_image_can_overflow_the_bucket():
    """per-image (diffusers parity) rounds each image at area B and may exceed 2*B/256 tokens."""
    layout = pack_references([(4, 3)], 1024, policy="per-image")
    assert layout.num_image_tokens > image_token_range(B[1024]).max


# --- JSON, hashes, rendering -------------------------------------------------------------------------------


def test_json_round_trip(manifest):
    plan = make_plan(manifest, (1024, 2048), ("fp16", "fp8"), PlanOptions(weight_streaming_budget=123, cfg_batch=True))
    again = BuildPlan.from_json(plan.to_json())
    assert again == plan
    assert json.loads(again.to_json()) == json.loads(plan.to_json())


def test_json_rejects_other_schema(full_plan):
    data = json.loads(full_plan.to_json())
    data["schema_version"] = 99
    with pytest.raises(ManifestError, match="schema"):
        BuildPlan.from_json(json.dumps(data))
    with pytest.raises(ManifestError, match="malformed"):
        BuildPlan.from_json('{"schema_version": 2}')
    data["schema_version"] = 1  # the one-engine-per-bucket layout
    with pytest.raises(ManifestError, match="schema 1 is not supported"):
        BuildPlan.from_json(json.dumps(data))


def test_settings_hash(manifest):
    base = make_plan(manifest, (1024,), ("fp16",)).engines[0]
    assert base.settings_sha256() == make_plan(manifest, (1024,), ("fp16",)).engines[0].settings_sha256()
    other_level = make_plan(manifest, (1024,), ("fp16",), PlanOptions(builder_optimization_level=5)).engines[0]
    other_cache = make_plan(manifest, (1024,), ("fp16",), PlanOptions(timing_cache="elsewhere.cache")).engines[0]
    assert other_level.settings_sha256() != base.settings_sha256()
    assert other_cache.settings_sha256() == base.settings_sha256()


def test_format_table(manifest):
    plan = make_plan(manifest, (1024,), ("fp16", "fp8"))
    text = format_table(plan)
    assert "engines/dit.fp16.plan" in text and "onnx/dit.fp16.onnx" in text
    assert any(line.split()[-4:] == ["img_tokens", "1", "8192", "8192"] for line in text.splitlines())
    assert "skipped dit.fp8" in text
    two = format_table(make_plan(manifest, (1024, 2048), ("fp16",)))
    assert "0: b1024" in two and "1: b2048" in two
    assert any(line.split()[-4:] == ["img_tokens", "1", "32768", "32768"] for line in two.splitlines())


# --- polygraphy command lines ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def convert_parser() -> argparse.ArgumentParser:
    pytest.importorskip("polygraphy")
    from polygraphy.tools.convert.convert import Convert

    parser = argparse.ArgumentParser(prog="polygraphy")
    Convert().setup_parser(parser.add_subparsers())
    return parser


def _convert_help(parser: argparse.ArgumentParser) -> str:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["convert"].format_help()


def test_polygraphy_commands_parse(manifest, convert_parser, tmp_path):
    from polygraphy.tools.args.util.util import parse_meta

    options = PlanOptions(builder_optimization_level=4, refittable=True, weight_streaming_budget=1 << 30)
    plan = make_plan(manifest, (1024, 2048), ("fp16",), options)
    help_text = _convert_help(convert_parser)
    lines = polygraphy_commands(plan, tmp_path / "my art")
    assert len(lines) == len(plan.engines)
    for line, engine in zip(lines, plan.engines, strict=True):
        argv = shlex.split(line)
        assert argv[:2] == ["polygraphy", "convert"]
        for flag in (a for a in argv if a.startswith("--")):
            assert flag in help_text, flag
        args = convert_parser.parse_args(argv[1:])
        assert args.model_file == str(tmp_path / "my art" / engine.onnx_file)
        assert args.output == str(tmp_path / "my art" / engine.engine_file)
        assert args.convert_to == "trt" and args.strongly_typed
        assert args.builder_optimization_level == 4 and args.refittable
        assert bool(args.weight_streaming) == (engine.graph == "dit")
        assert args.load_timing_cache == args.save_timing_cache == str(tmp_path / "my art" / "engines/timing.cache")
        for key, given_ in (("min", args.trt_min_shapes), ("opt", args.trt_opt_shapes), ("max", args.trt_max_shapes)):
            assert len(given_) == len(engine.profiles) == 2  # one group per profile, in bucket order
            for group, profile in zip(given_, engine.profiles, strict=True):
                meta = parse_meta(group, includes_dtype=False)
                assert list(meta.keys()) == list(profile.names)
                for name in profile.names:
                    assert tuple(meta[name].shape) == getattr(profile[name], key)


def test_polygraphy_command_defaults_have_no_optional_flags(full_plan):
    argv = polygraphy_command(full_plan.engines[0], "ART")
    assert "--refittable" not in argv and "--weight-streaming" not in argv
    assert argv[2] == "ART/onnx/dit.fp16.onnx"


# --- the CLI -----------------------------------------------------------------------------------------------


@pytest.fixture()
def art_dir(tmp_path):
    _manifest(budgets=(1024, 2048)).save(tmp_path)
    return tmp_path


def test_cli_dry_run(art_dir, capsys):
    assert main(["build", str(art_dir), "--budgets", "1024,2048", "--precision", "fp16,fp8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "engines/dit.fp16.plan" in out and "skipped dit.fp8" in out
    commands = [line for line in out.splitlines() if line.startswith("polygraphy convert")]
    assert len(commands) == 3 and f"{art_dir}/engines/vae_decoder.fp16.plan" in commands[-1]
    assert all(c.count("--trt-max-shapes") == 2 for c in commands)
    written = BuildPlan.from_json((art_dir / PLAN_FILE).read_text())
    assert [e.name for e in written.engines] == ["dit.fp16", "vae_encoder.fp32", "vae_decoder.fp16"]


def test_cli_dry_run_json_defaults_to_manifest_budgets(art_dir, capsys):
    assert main(["build", str(art_dir), "--dry-run", "--json"]) == 0
    plan = BuildPlan.from_json(capsys.readouterr().out)
    assert {e.budgets for e in plan.engines} == {(B[1024], B[2048])}


def test_cli_bad_precision(art_dir, capsys):
    assert main(["build", str(art_dir), "--precision", "fp4", "--dry-run"]) == 2
    assert "fp4" in capsys.readouterr().err


def test_cli_build_without_tensorrt_exits_2(art_dir, capsys, monkeypatch):
    if is_available("tensorrt"):  # on a TensorRT machine, exercise the same path with a stated reason
        import uniref_deploy.engines.build as build

        monkeypatch.setattr(build, "check_build_environment", lambda: "TensorRT is not installed (test)")
    assert main(["build", str(art_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: Cannot build TensorRT engines") and "TensorRT" in err and "--dry-run" in err
    assert not (art_dir / "engines" / "dit.fp16.plan").exists()


@pytest.mark.skipif(is_available("tensorrt"), reason="TensorRT is installed here")
def test_check_build_environment_names_tensorrt():
    from uniref_deploy.engines.build import check_build_environment

    reason = check_build_environment()
    assert reason is not None and "TensorRT" in reason and "\n" not in reason


def test_build_engines_refuses_without_tensorrt(art_dir, full_plan, monkeypatch):
    import uniref_deploy.engines.build as build
    from uniref_deploy.runtime.errors import MissingDependencyError

    monkeypatch.setattr(build, "check_build_environment", lambda: "no NVIDIA GPU is visible (test)")
    with pytest.raises(MissingDependencyError, match="no NVIDIA GPU"):
        build.build_engines(art_dir, full_plan)


def test_parse_bytes():
    from uniref_deploy.tools.commands.build import _parse_bytes

    assert _parse_bytes("8G") == 8 << 30 and _parse_bytes("512m") == 512 << 20 and _parse_bytes("100") == 100
    with pytest.raises(InputError):
        _parse_bytes("lots")


def test_vae_profiles_are_bounded_by_the_manifest_tile():
    import dataclasses

    from uniref_deploy.runtime.tiling import VaeTiling

    manifest = _manifest(budgets=(1024, 1536, 2048))
    untiled = make_plan(manifest, (1024, 1536, 2048))
    tiled_model = dataclasses.replace(manifest.model, vae={**manifest.model.vae, "tiling": VaeTiling().to_dict()})
    tiled = make_plan(dataclasses.replace(manifest, model=tiled_model), (1024, 1536, 2048))
    for name in ("vae_encoder.fp32", "vae_decoder.fp16"):
        before = [dict(p.axes) for p in untiled.engine(name).profiles]
        after = [dict(p.axes) for p in tiled.engine(name).profiles]
        assert max(r.max for axes in before for r in axes.values()) > 2048 // 8  # untiled: the aspect decides
        for axes in after:
            sides = [r for k, r in axes.items() if k != "batch"]
            scale = 8 if name.startswith("vae_decoder") else 1
            assert all(r.max * scale <= VaeTiling().tile and r.min * scale <= 16 for r in sides)
