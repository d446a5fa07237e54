"""The release's AutoAugment policies and magnitudes (finegrain.data.autoaugment_release).

The lists below are copied, as written, from clovaai/assembled-cnn preprocessing/autoaugment.py
(last changed in commit 45bb83bca16c0f3607135c8973a125b53b0f5626, unchanged at
9cdc29761d828ecd3708ea13e5acc44c696ec30f):
`good_policies()` and `imagenet_policies()`, concatenated in the order their `return` lines give.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finegrain.data import DEMO_ROOT, decode_rgb
from finegrain.data.autoaugment_release import (FILL, GOOD_POLICY, IMAGENET_POLICY, ReleaseAutoAugment,
                                                apply_operation, magnitude)
from finegrain.errors import FinegrainError


def release_good_policies() -> list:
    exp0_0 = [
      [('Invert', 0.1, 7), ('Contrast', 0.2, 6)],
      [('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)],
      [('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)],
      [('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)],
      [('AutoContrast', 0.5, 8), ('Equalize', 0.9, 2)]]
    exp0_1 = [
      [('Solarize', 0.4, 5), ('AutoContrast', 0.9, 3)],
      [('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)],
      [('AutoContrast', 0.9, 2), ('Solarize', 0.8, 3)],
      [('Equalize', 0.8, 8), ('Invert', 0.1, 3)],
      [('TranslateY', 0.7, 9), ('AutoContrast', 0.9, 1)]]
    exp0_2 = [
      [('Solarize', 0.4, 5), ('AutoContrast', 0.0, 2)],
      [('TranslateY', 0.7, 9), ('TranslateY', 0.7, 9)],
      [('AutoContrast', 0.9, 0), ('Solarize', 0.4, 3)],
      [('Equalize', 0.7, 5), ('Invert', 0.1, 3)],
      [('TranslateY', 0.7, 9), ('TranslateY', 0.7, 9)]]
    exp0_3 = [
      [('Solarize', 0.4, 5), ('AutoContrast', 0.9, 1)],
      [('TranslateY', 0.8, 9), ('TranslateY', 0.9, 9)],
      [('AutoContrast', 0.8, 0), ('TranslateY', 0.7, 9)],
      [('TranslateY', 0.2, 7), ('Color', 0.9, 6)],
      [('Equalize', 0.7, 6), ('Color', 0.4, 9)]]
    exp1_0 = [
      [('ShearY', 0.2, 7), ('Posterize', 0.3, 7)],
      [('Color', 0.4, 3), ('Brightness', 0.6, 7)],
      [('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)],
      [('Equalize', 0.6, 5), ('Equalize', 0.5, 1)],
      [('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)]]
    exp1_1 = [
      [('Brightness', 0.3, 7), ('AutoContrast', 0.5, 8)],
      [('AutoContrast', 0.9, 4), ('AutoContrast', 0.5, 6)],
      [('Solarize', 0.3, 5), ('Equalize', 0.6, 5)],
      [('TranslateY', 0.2, 4), ('Sharpness', 0.3, 3)],
      [('Brightness', 0.0, 8), ('Color', 0.8, 8)]]
    exp1_2 = [
      [('Solarize', 0.2, 6), ('Color', 0.8, 6)],
      [('Solarize', 0.2, 6), ('AutoContrast', 0.8, 1)],
      [('Solarize', 0.4, 1), ('Equalize', 0.6, 5)],
      [('Brightness', 0.0, 0), ('Solarize', 0.5, 2)],
      [('AutoContrast', 0.9, 5), ('Brightness', 0.5, 3)]]
    exp1_3 = [
      [('Contrast', 0.7, 5), ('Brightness', 0.0, 2)],
      [('Solarize', 0.2, 8), ('Solarize', 0.1, 5)],
      [('Contrast', 0.5, 1), ('TranslateY', 0.2, 9)],
      [('AutoContrast', 0.6, 5), ('TranslateY', 0.0, 9)],
      [('AutoContrast', 0.9, 4), ('Equalize', 0.8, 4)]]
    exp1_4 = [
      [('Brightness', 0.0, 7), ('Equalize', 0.4, 7)],
      [('Solarize', 0.2, 5), ('Equalize', 0.7, 5)],
      [('Equalize', 0.6, 8), ('Color', 0.6, 2)],
      [('Color', 0.3, 7), ('Color', 0.2, 4)],
      [('AutoContrast', 0.5, 2), ('Solarize', 0.7, 2)]]
    exp1_5 = [
      [('AutoContrast', 0.2, 0), ('Equalize', 0.1, 0)],
      [('ShearY', 0.6, 5), ('Equalize', 0.6, 5)],
      [('Brightness', 0.9, 3), ('AutoContrast', 0.4, 1)],
      [('Equalize', 0.8, 8), ('Equalize', 0.7, 7)],
      [('Equalize', 0.7, 7), ('Solarize', 0.5, 0)]]
    exp1_6 = [
      [('Equalize', 0.8, 4), ('TranslateY', 0.8, 9)],
      [('TranslateY', 0.8, 9), ('TranslateY', 0.6, 9)],
      [('TranslateY', 0.9, 0), ('TranslateY', 0.5, 9)],
      [('AutoContrast', 0.5, 3), ('Solarize', 0.3, 4)],
      [('Solarize', 0.5, 3), ('Equalize', 0.4, 4)]]
    exp2_0 = [
      [('Color', 0.7, 7), ('TranslateX', 0.5, 8)],
      [('Equalize', 0.3, 7), ('AutoContrast', 0.4, 8)],
      [('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)],
      [('Brightness', 0.9, 6), ('Color', 0.2, 8)],
      [('Solarize', 0.5, 2), ('Invert', 0.0, 3)]]
    exp2_1 = [
      [('AutoContrast', 0.1, 5), ('Brightness', 0.0, 0)],
      [('Cutout', 0.2, 4), ('Equalize', 0.1, 1)],
      [('Equalize', 0.7, 7), ('AutoContrast', 0.6, 4)],
      [('Color', 0.1, 8), ('ShearY', 0.2, 3)],
      [('ShearY', 0.4, 2), ('Rotate', 0.7, 0)]]
    exp2_2 = [
      [('ShearY', 0.1, 3), ('AutoContrast', 0.9, 5)],
      [('TranslateY', 0.3, 6), ('Cutout', 0.3, 3)],
      [('Equalize', 0.5, 0), ('Solarize', 0.6, 6)],
      [('AutoContrast', 0.3, 5), ('Rotate', 0.2, 7)],
      [('Equalize', 0.8, 2), ('Invert', 0.4, 0)]]
    exp2_3 = [
      [('Equalize', 0.9, 5), ('Color', 0.7, 0)],
      [('Equalize', 0.1, 1), ('ShearY', 0.1, 3)],
      [('AutoContrast', 0.7, 3), ('Equalize', 0.7, 0)],
      [('Brightness', 0.5, 1), ('Contrast', 0.1, 7)],
      [('Contrast', 0.1, 4), ('Solarize', 0.6, 5)]]
    exp2_4 = [
      [('Solarize', 0.2, 3), ('ShearX', 0.0, 0)],
      [('TranslateX', 0.3, 0), ('TranslateX', 0.6, 0)],
      [('Equalize', 0.5, 9), ('TranslateY', 0.6, 7)],
      [('ShearX', 0.1, 0), ('Sharpness', 0.5, 1)],
      [('Equalize', 0.8, 6), ('Invert', 0.3, 6)]]
    exp2_5 = [
      [('AutoContrast', 0.3, 9), ('Cutout', 0.5, 3)],
      [('ShearX', 0.4, 4), ('AutoContrast', 0.9, 2)],
      [('ShearX', 0.0, 3), ('Posterize', 0.0, 3)],
      [('Solarize', 0.4, 3), ('Color', 0.2, 4)],
      [('Equalize', 0.1, 4), ('Equalize', 0.7, 6)]]
    exp2_6 = [
      [('Equalize', 0.3, 8), ('AutoContrast', 0.4, 3)],
      [('Solarize', 0.6, 4), ('AutoContrast', 0.7, 6)],
      [('AutoContrast', 0.2, 9), ('Brightness', 0.4, 8)],
      [('Equalize', 0.1, 0), ('Equalize', 0.0, 6)],
      [('Equalize', 0.8, 4), ('Equalize', 0.0, 4)]]
    exp2_7 = [
      [('Equalize', 0.5, 5), ('AutoContrast', 0.1, 2)],
      [('Solarize', 0.5, 5), ('AutoContrast', 0.9, 5)],
      [('AutoContrast', 0.6, 1), ('AutoContrast', 0.7, 8)],
      [('Equalize', 0.2, 0), ('AutoContrast', 0.1, 2)],
      [('Equalize', 0.6, 9), ('Equalize', 0.4, 4)]]

    exp0s = exp0_0 + exp0_1 + exp0_2 + exp0_3
    exp1s = exp1_0 + exp1_1 + exp1_2 + exp1_3 + exp1_4 + exp1_5 + exp1_6
    exp2s = exp2_0 + exp2_1 + exp2_2 + exp2_3 + exp2_4 + exp2_5 + exp2_6 + exp2_7
    return exp0s + exp1s + exp2s


def release_imagenet_policies() -> list:
    exp0_0 = [
      [('Posterize', 0.4, 8), ('Rotate', 0.6, 9)],
      [('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)],
      [('Equalize', 0.8, 8), ('Equalize', 0.6, 3)],
      [('Posterize', 0.6, 7), ('Posterize', 0.6, 6)],
      [('Equalize', 0.4, 7), ('Solarize', 0.2, 4)]]
    exp1_0 = [
      [('Equalize', 0.4, 4), ('Rotate', 0.8, 8)],
      [('Solarize', 0.6, 3), ('Equalize', 0.6, 7)],
      [('Posterize', 0.8, 5), ('Equalize', 1.0, 2)],
      [('Rotate', 0.2, 3), ('Solarize', 0.6, 8)],
      [('Equalize', 0.6, 8), ('Posterize', 0.4, 6)]]
    exp2_0 = [
      [('Rotate', 0.8, 8), ('Color', 0.4, 0)],
      [('Rotate', 0.4, 9), ('Equalize', 0.6, 2)],
      [('Equalize', 0.0, 7), ('Equalize', 0.8, 8)],
      [('Invert', 0.6, 4), ('Equalize', 1.0, 8)],
      [('Color', 0.6, 4), ('Contrast', 1.0, 8)]]
    exp3_0 = [
      [('Rotate', 0.8, 8), ('Color', 1.0, 2)],
      [('Color', 0.8, 8), ('Solarize', 0.8, 7)],
      [('Sharpness', 0.4, 7), ('Invert', 0.6, 8)],
      [('ShearX', 0.6, 5), ('Equalize', 1.0, 9)],
      [('Color', 0.4, 0), ('Equalize', 0.6, 3)]]
    exp4_0 = [
      [('Equalize', 0.4, 7), ('Solarize', 0.2, 4)],
      [('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)],
      [('Invert', 0.6, 4), ('Equalize', 1.0, 8)],
      [('Color', 0.6, 4), ('Contrast', 1.0, 8)],
      [('Equalize', 0.8, 8), ('Equalize', 0.6, 3)]]

    return exp0_0 + exp1_0 + exp2_0 + exp3_0 + exp4_0


@pytest.mark.parametrize("ours, release", [(GOOD_POLICY, release_good_policies()),
                                           (IMAGENET_POLICY, release_imagenet_policies())])
def test_policies_are_the_releases_sub_policy_by_sub_policy(ours: tuple, release: list) -> None:
    assert len(ours) == len(release)
    for index, (mine, theirs) in enumerate(zip(ours, release)):
        assert mine == tuple(tuple(operation) for operation in theirs), f"sub-policy {index}"


# The release's level_to_arg (hparams translate_const=250, cutout_const=100), written as it computes.
@pytest.mark.parametrize("name, level, release", [
    ("Rotate", 9, (9 / 10.) * 30.), ("ShearY", 8, (8 / 10.) * 0.3), ("TranslateX", 9, (9 / 10.) * float(250)),
    ("TranslateY", 3, (3 / 10.) * float(250)), ("Color", 3, (3 / 10.) * 1.8 + 0.1),
    ("Contrast", 6, (6 / 10.) * 1.8 + 0.1), ("Posterize", 7, int((7 / 10.) * 4)),
    ("Solarize", 5, int((5 / 10.) * 256)), ("Solarize", 0, 0), ("Cutout", 4, int((4 / 10.) * 100)),
])
def test_magnitudes_are_the_releases_tf_ones(name: str, level: int, release: float) -> None:
    assert magnitude(name, level) == release


def test_every_operation_of_the_policies_is_known() -> None:
    for name, _, level in {op for sub in GOOD_POLICY + IMAGENET_POLICY for op in sub}:
        magnitude(name, level)
    with pytest.raises(FinegrainError, match="'SolarizeAdd' is not one of the release's"):
        magnitude("SolarizeAdd", 3)
    with pytest.raises(FinegrainError, match="Unknown release AutoAugment policy 'svhn'"):
        ReleaseAutoAugment("svhn")


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A shipped demo photo, uint8 [3, 100, 100]."""
    path = sorted((DEMO_ROOT / "train" / "Lemon").glob("*.jpg"))[0]
    return torch.from_numpy(decode_rgb(str(path))).permute(2, 0, 1).contiguous()


def test_a_level_9_translation_moves_the_image_out_of_the_frame(photo: torch.Tensor) -> None:
    """225 px at level 9: at 224 px (and at the photo's 100) nothing of the image stays."""
    torch.manual_seed(0)
    assert bool((apply_operation(photo, "TranslateX", 9) == FILL).all())
    shifted = apply_operation(photo, "TranslateY", 2)  # 50 rows of grey on one side, the rest moved
    top, bottom = shifted[:, :50], shifted[:, 50:]
    if bool((top == FILL).all()):
        assert torch.equal(bottom, photo[:, :50])
    else:
        assert bool((shifted[:, 50:] == FILL).all()) and torch.equal(shifted[:, :50], photo[:, 50:])


def test_cutout_greys_a_square_of_twice_the_level_side(photo: torch.Tensor) -> None:
    torch.manual_seed(3)
    changed = (apply_operation(photo, "Cutout", 2) != photo).any(0)  # a 40 x 40 square, clipped at the border
    rows, cols = changed.nonzero(as_tuple=True)
    assert 0 < int(rows.max() - rows.min()) < 40 and 0 < int(cols.max() - cols.min()) < 40


def test_integer_operations_match_the_releases_arithmetic(photo: torch.Tensor) -> None:
    pixels = photo.numpy()
    solarized = np.where(pixels < 128, pixels, 255 - pixels)  # TF solarize at threshold int(5/10 * 256)
    assert np.array_equal(apply_operation(photo, "Solarize", 5).numpy(), solarized)
    shift = 8 - int(7 / 10 * 4)  # TF posterize keeps int(level/10 * 4) bits
    assert np.array_equal(apply_operation(photo, "Posterize", 7).numpy(), (pixels >> shift) << shift)
    assert np.array_equal(apply_operation(photo, "Solarize", 0).numpy(), 255 - pixels)  # level 0 inverts all


def test_the_policy_draws_from_torchs_rng(photo: torch.Tensor) -> None:
    augment = ReleaseAutoAugment("release_good")
    torch.manual_seed(7)
    first = [augment(photo) for _ in range(20)]
    torch.manual_seed(7)
    again = [augment(photo) for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sum(not torch.equal(a, photo) for a in first) > 5 and all(a.dtype == torch.uint8 for a in first)


def test_train_transform_applies_the_release_policy() -> None:
    from finegrain.data.transforms import train_transform
    from finegrain.preprocessing import IMAGENET

    transform = train_transform(IMAGENET, "release_good")
    assert isinstance(transform.pixel_ops, ReleaseAutoAugment)
    image = decode_rgb(str(sorted((DEMO_ROOT / "train" / "Lemon").glob("*.jpg"))[0]))
    assert transform(image).shape == (3, 224, 224)


@pytest.mark.parametrize("seed", [0, 1])
def test_shears_turn_about_the_top_left_corner_as_the_releases(photo: torch.Tensor, seed: int) -> None:
    """TF's transform [1, level, 0, 0, 1, 0, 0, 0] reads input (x + level * y, y): row 0 stays."""
    torch.manual_seed(seed)
    sheared_x, sheared_y = apply_operation(photo, "ShearX", 8), apply_operation(photo, "ShearY", 8)
    assert torch.equal(sheared_x[:, 0], photo[:, 0]) and not torch.equal(sheared_x, photo)
    assert torch.equal(sheared_y[:, :, 0], photo[:, :, 0]) and not torch.equal(sheared_y, photo)


def test_the_release_policy_travels_to_loader_workers() -> None:
    import pickle

    augment = pickle.loads(pickle.dumps(ReleaseAutoAugment("release_imagenet")))
    assert augment.sub_policies == IMAGENET_POLICY
