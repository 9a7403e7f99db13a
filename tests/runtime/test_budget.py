"""The Budget value type: the one place that converts sides and pixel counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uniref_deploy.runtime.backends.base import Backend
from uniref_deploy.runtime.budget import TRAINED_SIDES, Budget, trained_budgets
from uniref_deploy.runtime.errors import InputError
from uniref_deploy.runtime.manifest import ModelConfig
from uniref_deploy.runtime.pipeline import Pipeline
from uniref_deploy.runtime.scheduler import QWEN_IMAGE_SCHEDULER_CONFIG


def test_trained_sides_are_square_and_named_by_side() -> None:
    assert [b.pixels for b in trained_budgets()] == [s * s for s in TRAINED_SIDES]
    assert [b.name for b in trained_budgets()] == ["1024", "1536", "2048"]
    assert [b.max_image_tokens for b in trained_budgets()] == [8192, 18432, 32768]
    assert all(b.is_trained for b in trained_budgets())


def test_api_coercion_takes_pixels_with_trained_side_shorthand() -> None:
    assert Budget.coerce(1024) == Budget.from_side(1024) == Budget.coerce(1024 * 1024)
    assert Budget.coerce(64 * 64).pixels == 4096 and Budget.coerce(4096).side == 64
    assert Budget.coerce(Budget(300_000)) == Budget(300_000)


def test_cli_parsing_reads_sides_pixels_and_sizes() -> None:
    assert Budget.parse("512") == Budget.from_side(512)
    assert Budget.parse("1048576") == Budget.from_side(1024)
    assert Budget.parse("640x480").pixels == 640 * 480
    assert Budget.parse("640x480").name == "307200px" and not Budget.parse("640x480").is_square
    assert Budget.parse("307200px") == Budget.parse("640x480") and Budget.parse("100px").pixels == 100


@pytest.mark.parametrize("bad", [0, -1, 1.5, "1024", None, True])
def test_coerce_refuses_non_positive_integers(bad: object) -> None:
    with pytest.raises(InputError):
        Budget.coerce(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "abc", "0", "-5", "10x", "x10", "3x0"])
def test_parse_refuses_garbage(bad: str) -> None:
    with pytest.raises(InputError):
        Budget.parse(bad)


@given(st.integers(min_value=1, max_value=8192))
def test_side_round_trip(side: int) -> None:
    budget = Budget.from_side(side)
    assert budget.side == side and budget.is_square and Budget.parse(str(side)) == budget
    assert Budget.parse(budget.name) == budget


class _Graph(Backend):
    """A backend that never runs: only its ``fixed_buckets`` matters to the budget rule."""

    def __init__(self, fixed: bool):
        super().__init__("dit", (), ())
        self.fixed_buckets = fixed

    def _infer_impl(self, feeds):  # pragma: no cover - never called
        raise AssertionError


def _pipeline(fixed: bool, budgets) -> Pipeline:
    config = ModelConfig("qwen-image", {"in_channels": 64, "joint_attention_dim": 32, "axes_dims_rope": [8, 4, 4]},
                         {"z_dim": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16},
                         dict(QWEN_IMAGE_SCHEDULER_CONFIG))
    return Pipeline(config, {"dit": _Graph(fixed)}, budgets=budgets)


def test_dynamic_graphs_run_any_budget_up_to_the_largest_compiled() -> None:
    pipe = _pipeline(False, [Budget.from_side(1024)])
    for ok in (Budget.from_side(1024), Budget.from_side(512), Budget.parse("640x480"), Budget(1)):
        pipe.check_budget(ok)
    with pytest.raises(InputError, match="largest budget compiled"):
        pipe.check_budget(Budget.from_side(1024 + 16))


def test_fixed_buckets_need_a_compiled_budget() -> None:
    pipe = _pipeline(True, [Budget.from_side(1024), Budget.from_side(2048)])
    pipe.check_budget(Budget.from_side(2048))
    with pytest.raises(InputError, match="no compiled TensorRT bucket"):
        pipe.check_budget(Budget.from_side(1536))


def test_without_compiled_budgets_any_budget_up_to_the_largest_trained_goes() -> None:
    pipe = _pipeline(False, None)
    pipe.check_budget(Budget.from_side(2048))
    pipe.check_budget(Budget.parse("640x480"))
    with pytest.raises(InputError, match="largest trained budget"):
        pipe.check_budget(Budget.from_side(4096))
