"""Block-wise random masks over the patch grid, for the iBOT masked-image-modelling loss of DINOv2.

A mask is built from random rectangles of patches: each rectangle covers at least `min_num_patches`
patches and has an aspect ratio (height / width) drawn log-uniformly in `[min_aspect, max_aspect]`.
Rectangles may overlap earlier ones; one is kept only when it adds between 1 and the still-missing number of
patches, so the total never exceeds the request.  When fewer patches are missing than a rectangle's minimum
area, rectangles are placed over an already masked patch so that they can top the mask up exactly.
"""

from __future__ import annotations

import math
import random

import numpy as np


class MaskingGenerator:
    """`generator(n)` → boolean array `(H, W)` with at most `n` masked patches.

    Most masks hit `n` exactly; the rest fall a patch or two short, because a rectangle of at least
    `min_num_patches` patches with a bounded aspect ratio often cannot add exactly the last one or two.

    Args:
        input_size: the patch grid, `H` or `(H, W)`.
        max_num_patches: the largest area of one rectangle (default: the whole grid; DINOv2 uses half of it).
        min_num_patches: the smallest area of one rectangle (DINOv2: 4).  A request smaller than this on an
            empty grid is met with a single rectangle of exactly the requested area.
        min_aspect, max_aspect: range of height/width of a rectangle; `max_aspect` defaults to `1/min_aspect`.
        max_attempts: consecutive failed placements after which the mask is returned as it is, so a request
            that cannot be met exactly (or nearly full grids) cannot loop forever.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: int | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 100,
    ):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.max_num_patches = self.num_patches if max_num_patches is None else int(max_num_patches)
        self.min_num_patches = int(min_num_patches)
        if not 1 <= self.min_num_patches <= self.max_num_patches:
            raise ValueError(f"need 1 <= min_num_patches ({min_num_patches}) <= max_num_patches ({max_num_patches})")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be positive, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect_range = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.max_attempts = int(max_attempts)

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.height}x{self.width}, blocks of {self.min_num_patches}.."
            f"{self.max_num_patches} patches, aspect {self.min_aspect:.3g}..{self.max_aspect:.3g})"
        )

    def _sample_block(self, min_area: int, max_area: int) -> tuple[int, int] | None:
        """A (height, width) with area in [min_area, max_area] and an admissible aspect, or None."""
        area = random.uniform(min_area, max_area)
        aspect = math.exp(random.uniform(*self.log_aspect_range))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        # Rounding can push area or aspect out of range; such draws count as failed attempts.
        if not (1 <= h <= self.height and 1 <= w <= self.width and min_area <= h * w <= max_area):
            return None
        if not self.min_aspect - 1e-9 <= h / w <= self.max_aspect + 1e-9:
            return None
        return h, w

    def _place(self, mask: np.ndarray, h: int, w: int, anchored: bool) -> tuple[int, int]:
        """Top-left corner of an h×w block: uniform, or (to top up the last few patches) covering a masked cell.

        Fewer missing patches than the block minimum can only be added by a block that mostly overlaps the
        mask; anchoring it on a random masked cell makes that likely instead of rare.
        """
        if not anchored:
            return random.randint(0, self.height - h), random.randint(0, self.width - w)
        rows, cols = np.nonzero(mask)
        pick = random.randrange(len(rows))
        row, col = int(rows[pick]), int(cols[pick])
        top = random.randint(max(0, row - h + 1), min(row, self.height - h))
        left = random.randint(max(0, col - w + 1), min(col, self.width - w))
        return top, left

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        target = min(int(num_masking_patches), self.num_patches)
        masked, failures = 0, 0
        while masked < target and failures < self.max_attempts:
            missing = target - masked
            # Only a request below the block minimum on an empty grid may use a smaller block.
            min_area = min(self.min_num_patches, missing) if masked == 0 else self.min_num_patches
            # Blocks larger than the missing count only fit by overlapping; cap the area to keep draws useful.
            max_area = max(min_area, min(self.max_num_patches, missing))
            block = self._sample_block(min_area, max_area)
            if block is None:
                failures += 1
                continue
            h, w = block
            top, left = self._place(mask, h, w, anchored=masked > 0 and missing < self.min_num_patches)
            region = mask[top : top + h, left : left + w]
            added = region.size - int(region.sum())
            if 0 < added <= missing:
                region[...] = True
                masked += added
                failures = 0
            else:
                failures += 1
        return mask
