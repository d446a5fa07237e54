"""ImageNet-P-style perturbation sequences, generated on the fly from evaluation images.

What we generate (parameters follow Hendrycks & Dietterich's `make_imagenet_p.py`; frame index
i runs over the published 31 frames, 41 for translate):

  test set (mFR):   gaussian_noise  frame 0 clean, then x + N(0, 0.03) per frame, independent
                    shot_noise      frame 0 clean, then Poisson(300 x) / 300 per frame
                    motion_blur     motion blur radius 10, sigma 3, angle (i - 30) * 4 degrees
                    zoom_blur       running mean of zooms 1 + 0.004 i (frame 0 unzoomed)
                    snow            one snow layer, motion-blurred at angle 4 i - 150 degrees
                    brightness      HSV value + (i - 15) * 0.02
                    translate       horizontal shift of i - 20 pixels
                    rotate          rotation by i - 15 degrees
                    tilt            3-D tilt of i - 15 degrees about both image axes
                    scale           zoom by (2.5 i + 40) / 100
  validation set:   speckle_noise   frame 0 clean, then x + x N(0, 0.05)
                    gaussian_blur   sigma 0.25 + 0.035 i
                    spatter         water drops that run down the image from frame to frame
                    shear           shear by i - 15 degrees

Geometric perturbations act on the image resized to `Preprocessing.resize` before the centre
crop (content enters from outside the crop, as published); the others act on the crop.

How this differs from the published ImageNet-P:
- The number of frames is configurable (2..31; published: 31, translate 41). Noise, zoom blur
  and spatter use the first `frames` frames; the other perturbations a window of `frames`
  consecutive published frames centred on the middle one, so the change between consecutive
  frames (what the flip rate measures) is the published one.
- Frames are not H.264-encoded into MP4 videos (the published ones are, with its artefacts).
- Frames are made at the model's eval resolution, with pixel-valued parameters (translate
  steps, blur radii) unchanged, rather than at 224 x 224.
- Motion blur is a one-sided Gaussian-weighted line kernel (OpenCV) instead of ImageMagick's;
  random draws come from numpy's PCG64 seeded per (image, perturbation, seed), so the noise
  samples differ from the published ones while being reproducible.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image
from skimage.color import hsv2rgb, rgb2hsv
from skimage.filters import gaussian
from torchvision.transforms.v2 import functional as TF

from finegrain.errors import FinegrainError

PERTURBATIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow",
    "brightness", "translate", "rotate", "tilt", "scale",
)
VALIDATION_PERTURBATIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "shear")
NOISE_PERTURBATIONS = frozenset({"gaussian_noise", "shot_noise", "speckle_noise"})
MAX_FRAMES = 31
_PUBLISHED_FRAMES = {"translate": 41}
_FROM_FIRST_FRAME = NOISE_PERTURBATIONS | {"zoom_blur", "spatter"}


def parse_perturbations(names: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate perturbation names; None means the 10 test perturbations of mFR."""
    from finegrain.eval.corruptions import parse_names

    return parse_names(names, PERTURBATIONS, PERTURBATIONS + VALIDATION_PERTURBATIONS, "perturbation")


def compares_to_first_frame(name: str) -> bool:
    """Noise sequences are independent draws around a clean frame 0: ImageNet-P compares each
    frame to the first; every other sequence is compared frame to previous frame."""
    return name in NOISE_PERTURBATIONS


def frame_indices(name: str, frames: int) -> np.ndarray:
    """Which of the published frame indices a sequence of `frames` frames uses."""
    if not 2 <= frames <= MAX_FRAMES:
        raise FinegrainError(f"frames={frames} is out of range. Use 2 to {MAX_FRAMES} frames per sequence.")
    published = _PUBLISHED_FRAMES.get(name, MAX_FRAMES)
    start = 0 if name in _FROM_FIRST_FRAME else (published - frames) // 2
    return np.arange(start, start + frames)


def perturbation_sequence(resized: np.ndarray, name: str, frames: int, crop: int, seed: int) -> np.ndarray:
    """uint8 [frames, crop, crop, 3]: `resized` (uint8 HxWx3, short side at the eval resize)
    perturbed over time, each frame centre-cropped like the eval transform."""
    parse_perturbations([name])
    indices = frame_indices(name, frames)
    rng = np.random.default_rng(seed)
    if name in _GEOMETRIC:
        return np.stack([_center_crop(_GEOMETRIC[name](resized, int(i)), crop) for i in indices])
    x = _center_crop(resized, crop).astype(np.float32) / 255.0
    return np.stack([_to_uint8(f) for f in _PHOTOMETRIC[name](x, indices, rng)])


def _center_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """Same offsets as albumentations' CenterCrop in the eval transform."""
    top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    return np.ascontiguousarray(image[top:top + crop, left:left + crop])


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    return np.uint8(np.clip(frame, 0.0, 1.0) * 255)


def _affine(image: np.ndarray, angle: float = 0.0, translate: tuple[int, int] = (0, 0),
            scale: float = 1.0, shear: float = 0.0) -> np.ndarray:
    moved = TF.affine(Image.fromarray(image), angle=angle, translate=list(translate), scale=scale,
                      shear=[shear, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
    return np.asarray(moved)


def _tilt(x: np.ndarray, i: int) -> np.ndarray:
    """Perspective view of the image rotated by the same angle about its x and y axes."""
    h, w = x.shape[:2]
    angle = np.deg2rad(i - 15)
    f = math.hypot(w, h)
    to_3d = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]])
    cos, sin = np.cos(angle), np.sin(angle)
    rot_x = np.array([[1, 0, 0, 0], [0, cos, -sin, 0], [0, sin, cos, 0], [0, 0, 0, 1]])
    rot_y = np.array([[cos, 0, -sin, 0], [0, 1, 0, 0], [sin, 0, cos, 0], [0, 0, 0, 1]])
    push = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]])
    to_2d = np.array([[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]])
    return cv2.warpPerspective(x, to_2d @ push @ rot_x @ rot_y @ to_3d, (w, h))


_GEOMETRIC = {
    "translate": lambda img, i: _affine(img, translate=(i - 20, 0)),
    "rotate": lambda img, i: _affine(img, angle=i - 15),
    "scale": lambda img, i: _affine(img, scale=(i * 2.5 + 40) / 100),
    "shear": lambda img, i: _affine(img, shear=i - 15),
    "tilt": _tilt,
}


def motion_blur(image: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """One-sided line blur with Gaussian weights along `angle` degrees (ImageMagick's motion blur)."""
    size = 2 * radius + 1
    kernel = np.zeros((size, size), np.float32)
    theta = np.deg2rad(angle)
    for step in range(radius + 1):
        row, col = radius + round(step * np.sin(theta)), radius + round(step * np.cos(theta))
        kernel[row, col] += math.exp(-(step**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    return cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REPLICATE)


def _noise_frames(sample):
    def frames(x, indices, rng):
        return [x if i == 0 else sample(x, rng) for i in indices]
    return frames


def _zoom_blur(x: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    image = _to_uint8(x)
    total, out = np.zeros_like(x), []
    for count, i in enumerate(indices, start=1):
        total += np.asarray(_affine(image, scale=1 + 0.004 * i), dtype=np.float32) / 255.0
        out.append(total / count)
    return out


def _zoom_center(layer: np.ndarray, factor: float) -> np.ndarray:
    h, w = layer.shape
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(layer[top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def _snow(x: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    layer = _zoom_center(rng.normal(0.05, 0.3, size=x.shape[:2]).astype(np.float32), 3)
    layer = np.clip(np.where(layer < 0.5, 0, layer), 0, 1)
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    base = 0.85 * x + 0.15 * np.maximum(x, gray * 1.5 + 0.5)
    out = []
    for i in indices:
        flakes = motion_blur(layer, radius=14, sigma=4, angle=i * 4 - 150)[..., None]
        out.append(base + flakes + np.rot90(flakes, k=2))
    return out


def _spatter(x: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Water drops (imagecorruptions' spatter at low severity) dripping down frame by frame."""
    liquid = gaussian(rng.normal(0.65, 0.27, size=x.shape[:2]), sigma=3.7)
    liquid[liquid < 0.69] = 0
    water = np.array([175, 238, 238], np.float32) / 255.0  # pale turquoise, RGB
    out = []
    for _ in indices:
        layer = (liquid * 255).astype(np.uint8)
        dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
        dist = cv2.equalizeHist(cv2.blur(np.minimum(dist, 20), (3, 3)).astype(np.uint8))
        dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])), (3, 3))
        mask = layer.astype(np.float32) * dist.astype(np.float32)
        mask = 0.6 * mask / max(float(mask.max()), 1e-6)
        out.append(x + mask[..., None] * water)
        liquid = np.apply_along_axis(lambda col: np.convolve(col, [0.05, 0.1, 0.15, 0.7], mode="same"), 0, liquid)
    return out


def _brightness(x: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    hsv, out = rgb2hsv(x), []
    for i in indices:
        shifted = hsv.copy()
        shifted[..., 2] = np.clip(shifted[..., 2] + (i - 15) * 0.02, 0, 1)
        out.append(hsv2rgb(shifted))
    return out


_PHOTOMETRIC = {
    "gaussian_noise": _noise_frames(lambda x, rng: x + rng.normal(0, 0.03, size=x.shape)),
    "shot_noise": _noise_frames(lambda x, rng: rng.poisson(x * 300) / 300.0),
    "speckle_noise": _noise_frames(lambda x, rng: x + x * rng.normal(0, 0.05, size=x.shape)),
    "motion_blur": lambda x, indices, rng: [motion_blur(x, 10, 3, (i - 30) * 4) for i in indices],
    "gaussian_blur": lambda x, indices, rng: [
        gaussian(x, sigma=0.25 + 0.035 * i, channel_axis=-1, truncate=6.0) for i in indices],
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "spatter": _spatter,
    "brightness": _brightness,
}
