"""Evaluation transforms: the fixed resize + centre crop used for features, and the linear-probe training crop.

These follow the DINO v1 / DINOv2 evaluation protocol: bicubic resize of the shorter side to 256, centre crop
224, ImageNet normalisation.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from torchvision import transforms

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# torchvision is imported where a transform is built, not with this module: importing it pulls in torch._dynamo
# (~170 MB of resident memory), which `dino extract` (image loading through `load_image_for`) does without
def __getattr__(name: str):
    if name == "BICUBIC":
        from torchvision import transforms

        return transforms.InterpolationMode.BICUBIC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_normalize() -> transforms.Compose:
    """PIL image → float tensor (C, H, W) normalised with the ImageNet mean and std."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def make_eval_transform(resize_size: int = 256, crop_size: int = 224) -> transforms.Compose:
    """Resize the shorter side to `resize_size` (bicubic), centre-crop `crop_size`, normalise.

    The transform carries `min_decode_side = resize_size`: what `load_image_for` may reduce a large image to
    while decoding (see there).
    """
    from torchvision import transforms

    if crop_size > resize_size:
        raise ValueError(f"crop_size {crop_size} is larger than resize_size {resize_size}")
    transform = transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop_size),
            make_normalize(),
        ]
    )
    transform.min_decode_side = int(resize_size)
    return transform


# ---------------------------------------------------------------------------------- reduced decoding

# A large image is decoded and shrunk to at least this many times the side the transform needs, by JPEG DCT
# scaling (`Image.draft`: the decoder itself produces 1/2, 1/4 or 1/8 of the pixels) and an integer box filter
# (`Image.reduce`); the transform's own bicubic resize then does the rest. Pillow's `reducing_gap` reasoning:
# with a gap of 2 the result cannot be told apart from a bicubic resize of the full image, at a fraction of its
# cost. Images whose shorter side is under the gap × the needed side are decoded exactly as before.
REDUCING_GAP = 2.0

_EXIF_ORIENTATION = 0x0112
_ORIENTATION_METHODS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def random_resized_crop_min_side(size: int, scale_min: float, ratio_min: float = 3 / 4) -> int:
    """Shorter image side at which a RandomResizedCrop of `size` px never upsamples its smallest crop.

    The smallest crop covers `scale_min` of the area with aspect ratio down to `ratio_min`: its short side is
    sqrt(scale_min · ratio_min) · S for an S×S image, which must reach `size`.
    """
    import math

    return int(math.ceil(size / math.sqrt(max(scale_min, 1e-6) * min(ratio_min, 1 / ratio_min))))


def min_decode_side(transform) -> int | None:
    """The shorter side a transform needs its input image to have (None: unknown, decode in full).

    `make_eval_transform` records it; DINO's multi-crop augmentation needs what its smallest global and
    local crops need (`random_resized_crop_min_side`).
    """
    recorded = getattr(transform, "min_decode_side", None)
    if recorded:
        return int(recorded)
    if all(
        hasattr(transform, a)
        for a in (
            "global_crops_size",
            "global_crops_scale",
            "local_crops_size",
            "local_crops_scale",
            "local_crops_number",
        )
    ):
        sides = [random_resized_crop_min_side(int(transform.global_crops_size), float(transform.global_crops_scale[0]))]
        if int(transform.local_crops_number) > 0:
            sides.append(
                random_resized_crop_min_side(int(transform.local_crops_size), float(transform.local_crops_scale[0]))
            )
        return max(sides)
    return None


def load_image_for(path: str | os.PathLike, min_side: int | None) -> Image.Image:
    """`dino.data.datasets.load_image`, decoding large images only to the size a transform needs.

    `min_side`: the shorter side the transform resizes to (`transform.min_decode_side`); None decodes in full.
    A 144-megapixel photo for a 256-pixel evaluation is then decoded at 1/8 scale (JPEG) or box-reduced right
    after decoding (PNG and other formats, which cannot decode a part), instead of being carried in full through
    the bicubic resize. RGB conversion and EXIF orientation are those of `load_image`; errors are the same
    `CorruptImageError`.
    """
    from dino.data.datasets import CorruptImageError, load_image, open_regular_file, to_rgb

    if not min_side:
        return load_image(path)
    path = os.fspath(path)
    target = REDUCING_GAP * int(min_side)
    try:
        # through open_regular_file: a FIFO or device named like an image is refused instead of blocking
        with open_regular_file(path) as handle, Image.open(handle) as opened:
            width, height = opened.size
            if min(width, height) <= target:
                opened.close()
                return load_image(path)  # nothing to gain: exactly the full decode
            try:
                orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # a malformed EXIF block must not cost us an otherwise good image
                orientation = 1
            if opened.format == "JPEG":
                scale = target / min(width, height)
                opened.draft(opened.mode, (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))
            opened.load()  # decode now: truncated files fail here, inside the try
            image = to_rgb(opened)
            factor = int(min(image.size) // target)
            if factor >= 2:
                image = image.reduce(factor)
            elif image is opened:
                image = image.copy()  # independent of the file closed with the `with` block
            method = _ORIENTATION_METHODS.get(orientation)
            return image.transpose(method) if method is not None else image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from err


def make_linear_train_transform(crop_size: int = 224) -> transforms.Compose:
    """Training transform of linear probes: RandomResizedCrop (bicubic), horizontal flip, normalise."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            make_normalize(),
        ]
    )
