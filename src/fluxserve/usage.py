"""Billable megapixels, by the per-megapixel rules FLUX.2 providers publish (seed 004's pricing notes):

* 1 megapixel (MP) = 1024x1024 pixels;
* each reference image and each output image is counted on its own, rounded up to the next whole megapixel,
  at least 1 MP each;
* a reference image above 4 MP counts as 4 MP (the model sees it resized to 4 MP).

And what an operator's price table (``[prices]`` in the catalogue) makes of them: per output image, its first
megapixel at ``first_megapixel``; every other megapixel (the rest of each output, and every reference's) at
``extra_megapixel``. Nothing here touches the database or the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MEGAPIXEL = 1024 * 1024
MAX_INPUT_MEGAPIXELS = 4


def megapixels(width: int, height: int) -> int:
    """One image's billable megapixels: its pixels rounded up to whole megapixels, at least 1."""
    if width <= 0 or height <= 0:
        raise ValueError(f"an image has positive sides, not {width}x{height}")
    return max(1, -(-(width * height) // MEGAPIXEL))


def input_megapixels(width: int, height: int) -> int:
    """A reference image's billable megapixels: as ``megapixels``, at most 4."""
    return min(MAX_INPUT_MEGAPIXELS, megapixels(width, height))


@dataclass(frozen=True)
class Billable:
    """What one job bills: its images and their megapixels."""

    input_images: int = 0
    input_megapixels: int = 0
    output_images: int = 0
    output_megapixels: int = 0

    @property
    def megapixels(self) -> int:
        return self.input_megapixels + self.output_megapixels


def billable(references: Iterable[tuple[int, int]], outputs: Iterable[tuple[int, int]]) -> Billable:
    """The billable images and megapixels of a finished job from its references' and outputs' (width, height)."""
    inputs = [input_megapixels(w, h) for w, h in references]
    produced = [megapixels(w, h) for w, h in outputs]
    return Billable(len(inputs), sum(inputs), len(produced), sum(produced))


@dataclass(frozen=True)
class Price:
    """An endpoint's price per megapixel, in the operator's currency."""

    first_megapixel: float
    extra_megapixel: float

    def cost(self, output_images: int, megapixels: int) -> float:
        """The price of ``megapixels`` billable megapixels of which ``output_images`` are output images' first."""
        firsts = min(output_images, megapixels)
        return firsts * self.first_megapixel + (megapixels - firsts) * self.extra_megapixel
