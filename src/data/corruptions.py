"""Image corruptions in the manner of ImageNet-C (Hendrycks & Dietterich 2019), at severities 1-5, for evaluation
sets that shift a test split (`data.eval_sets.<name>: {corruption: ..., severity: ...}`).

Implemented here with numpy, scipy.ndimage and Pillow rather than the `imagecorruptions` package, which needs
opencv-python and scikit-image (neither is in the base install). Each corruption follows the ImageNet-C parameter
table for its severity (`SEVERITY_PARAMS`), on float images in [0, 1]; the spatial parameters (blur radii and
sigmas, motion length) are defined for 224 px images and scaled by the image's shorter side / 224, so that a
corruption removes the same share of detail from an 8 px digit as from a 224 px photo. Randomness comes from the
`rng` the caller seeds per image, so a corrupted set is the same pixels in every run.

Torch-free: the config schema reads `CORRUPTIONS` from here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # Pillow and scipy are imported where used: the config schema imports this module
    from PIL import Image

CORRUPTION_VERSION = 1  # in the feature cache keys of corrupted sets: bump when a corruption changes
SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 224  # the image size the ImageNet-C spatial parameters are defined for

Corruption = Callable[[np.ndarray, Any, np.random.Generator, float], np.ndarray]


def _gaussian_noise(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    return x + rng.normal(scale=float(c), size=x.shape)


def _shot_noise(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    return rng.poisson(x * float(c)) / float(c)


def _impulse_noise(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Salt and pepper on a share `c` of the values (scikit-image's `s&p`, salt_vs_pepper 0.5)."""
    hit = rng.random(x.shape) < float(c)
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def _speckle_noise(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    return x + x * rng.normal(scale=float(c), size=x.shape)


def _gaussian_blur(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(float(c) * scale, float(c) * scale, 0))


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy.ndimage import convolve

    return np.stack([convolve(x[..., ch], kernel, mode="reflect") for ch in range(x.shape[-1])], axis=-1)


def _defocus_blur(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    """A disk kernel of the given radius, anti-aliased by a Gaussian of sigma `alias`."""
    from scipy.ndimage import gaussian_filter

    radius, alias = (float(v) * scale for v in c)
    half = max(int(np.ceil(radius)), 1)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk = gaussian_filter(disk / disk.sum(), sigma=alias)
    return _convolve(x, disk / disk.sum())


def _motion_blur(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Gaussian-weighted streak of length `radius` at a random angle in [-45, 45] degrees (ImageMagick's motion
    blur, which ImageNet-C calls through Wand)."""
    radius, sigma = (float(v) * scale for v in c)
    angle = np.deg2rad(rng.uniform(-45, 45))
    half = max(int(np.ceil(radius)), 1)
    kernel = np.zeros((2 * half + 1, 2 * half + 1))
    steps = np.arange(0, int(np.ceil(radius)) + 1)
    weights = np.exp(-(steps**2) / (2 * max(sigma, 1e-6) ** 2))
    for step, weight in zip(steps, weights, strict=True):
        kernel[half + round(step * np.sin(angle)), half + round(step * np.cos(angle))] += weight
    return _convolve(x, kernel / kernel.sum())


def _contrast(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * float(c) + means


def _brightness(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    """HSV value + c: RGB scaled by the new value over the old (hue and saturation kept); black turns grey."""
    value = x.max(axis=-1, keepdims=True)
    brighter = np.clip(value + float(c), 0, 1)
    return np.where(value > 0, x * brighter / np.maximum(value, 1e-12), brighter)


def _to_pil(x: np.ndarray) -> Image.Image:
    from PIL import Image

    pixels = np.uint8(np.clip(x, 0, 1) * 255 + 0.5)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float64) / 255
    return pixels[..., None] if channels == 1 else pixels


def _pixelate(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    from PIL import Image

    height, width = x.shape[:2]
    small = (max(round(width * float(c)), 1), max(round(height * float(c)), 1))
    image = _to_pil(x).resize(small, Image.Resampling.BOX).resize((width, height), Image.Resampling.BOX)
    return _from_pil(image, x.shape[-1])


def _jpeg_compression(x: np.ndarray, c: Any, rng: np.random.Generator, scale: float) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    _to_pil(x).save(buffer, "JPEG", quality=int(c))
    buffer.seek(0)
    with Image.open(buffer) as image:
        return _from_pil(image, x.shape[-1])


# name -> (function, its parameter at severities 1..5), the ImageNet-C values.
SEVERITY_PARAMS: dict[str, tuple[Corruption, tuple[Any, ...]]] = {
    "gaussian_noise": (_gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": (_shot_noise, (60, 25, 12, 5, 3)),
    "impulse_noise": (_impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27)),
    "speckle_noise": (_speckle_noise, (0.15, 0.2, 0.35, 0.45, 0.6)),
    "gaussian_blur": (_gaussian_blur, (1, 2, 3, 4, 6)),
    "defocus_blur": (_defocus_blur, ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
    "motion_blur": (_motion_blur, ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),
    "contrast": (_contrast, (0.4, 0.3, 0.2, 0.1, 0.05)),
    "brightness": (_brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "pixelate": (_pixelate, (0.6, 0.5, 0.4, 0.3, 0.25)),
    "jpeg_compression": (_jpeg_compression, (25, 18, 15, 10, 7)),
}
CORRUPTIONS = tuple(SEVERITY_PARAMS)


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`image` (H, W, C) in [0, 1], C = 1 or 3, corrupted by `name` at `severity` (1-5), clipped to [0, 1]."""
    function, params = SEVERITY_PARAMS[name]
    scale = min(image.shape[:2]) / REFERENCE_SIZE
    return np.clip(function(image.astype(np.float64), params[severity - 1], rng, scale), 0, 1).astype(np.float32)
