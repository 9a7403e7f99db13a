"""The pixel budget: one value type for what the CLI calls a side and the manifest stores as pixels.

A budget ``B`` bounds the pixels of a SELF-packed request: the target holds at most ``B`` pixels and the
references together at most ``B`` (``self``/``proportional`` policies). The model was trained at three square
budgets (1024², 1536², 2048²: the *trained* budgets, named by their side); the ONNX Runtime backend also runs any
smaller budget, since its graphs are fully dynamic.

A :class:`Budget` is created once at the edge (CLI option, API argument, manifest load) and passed everywhere;
this module is the only place that converts between sides and pixel counts.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from .errors import InputError

TRAINED_SIDES = (1024, 1536, 2048)
PIXELS_PER_TOKEN_SIDE = 16  # VAE downsample 8 x patch 2: one token per 16x16 pixels
PIXELS_PER_TOKEN = PIXELS_PER_TOKEN_SIDE * PIXELS_PER_TOKEN_SIDE
MAX_SIDE_SHORTHAND = 8192  # on the CLI, an integer up to this is a side; above it, a pixel count


@dataclass(frozen=True, order=True)
class Budget:
    """A global pixel budget.

    Attributes:
        pixels (int): the budget in pixels (the one unit stored in manifests).
    """

    pixels: int

    def __post_init__(self) -> None:
        if isinstance(self.pixels, bool) or not isinstance(self.pixels, int) or self.pixels <= 0:
            raise InputError(
                f"A budget must be a positive pixel count, got {self.pixels!r}.",
                f"pass a side such as {TRAINED_SIDES[0]} or a pixel count such as {TRAINED_SIDES[0] ** 2}.",
            )

    # ---- constructors --------------------------------------------------------------------------------------
    @classmethod
    def from_side(cls, side: int) -> Budget:
        """The square budget ``side × side``."""
        return cls(_positive_int(side, "budget side") ** 2)

    @classmethod
    def from_pixels(cls, pixels: int) -> Budget:
        """A budget of ``pixels`` pixels (any positive count)."""
        return cls(_positive_int(pixels, "budget"))

    @classmethod
    def coerce(cls, value: Budget | int) -> Budget:
        """The API's rule: a pixel count, with the trained sides (1024, 1536, 2048) accepted as shorthand.

        Raises:
            InputError: not a positive integer.
        """
        if isinstance(value, Budget):
            return value
        number = _positive_int(value, "budget")
        return cls.from_side(number) if number in TRAINED_SIDES else cls(number)

    @classmethod
    def parse(cls, text: str | int) -> Budget:
        """The CLI's rule: ``N`` up to 8192 is a side (``N²`` pixels), larger ``N`` a pixel count; ``Npx`` is
        always a pixel count and ``WxH`` is ``W·H`` pixels (so every :attr:`name` parses back).

        Raises:
            InputError: the text is neither form.
        """
        if isinstance(text, Budget):
            return text
        raw = str(text).strip().lower()
        try:
            if raw.endswith("px"):
                return cls.from_pixels(int(raw[:-2]))
            if "x" in raw:
                w, h = (int(part) for part in raw.split("x", 1))
                return cls.from_pixels(_positive_int(w, "budget width") * _positive_int(h, "budget height"))
            number = int(raw)
        except ValueError:
            raise InputError(
                f"Budget '{text}' is not a number.",
                "pass a side (1024), a pixel count (1048576) or a size (1024x1024).",
            ) from None
        number = _positive_int(number, "budget")
        return cls.from_side(number) if number <= MAX_SIDE_SHORTHAND else cls(number)

    # ---- derived values --------------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        """The side of the square holding ``pixels`` (floor of the square root; exact for square budgets)."""
        return math.isqrt(self.pixels)

    @property
    def is_square(self) -> bool:
        return self.side * self.side == self.pixels

    @property
    def is_trained(self) -> bool:
        return self.is_square and self.side in TRAINED_SIDES

    @property
    def name(self) -> str:
        """Short label for file names and tables: ``"1024"`` for 1024², ``"300000px"`` otherwise."""
        return str(self.side) if self.is_square else f"{self.pixels}px"

    @property
    def max_target_tokens(self) -> int:
        """Image tokens of a target at the full budget."""
        return self.pixels // PIXELS_PER_TOKEN

    @property
    def max_image_tokens(self) -> int:
        """Image tokens a bucket holds: target plus references, each at most ``B`` pixels."""
        return 2 * self.pixels // PIXELS_PER_TOKEN

    def __str__(self) -> str:
        return f"{self.side}²" if self.is_square else f"{self.pixels} px"


def trained_budgets() -> tuple[Budget, ...]:
    """The three budgets the model family was trained at."""
    return tuple(Budget.from_side(s) for s in TRAINED_SIDES)


def _positive_int(value: object, what: str) -> int:
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{what.capitalize()} must be an integer, got {value!r}.",
                         f"pass a side such as {TRAINED_SIDES[0]} or a pixel count.") from None
    if isinstance(value, bool) or number <= 0:
        raise InputError(f"{what.capitalize()} must be positive, got {value!r}.",
                         f"use a side such as {TRAINED_SIDES[0]} or a pixel count.")
    return number
