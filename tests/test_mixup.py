"""Mixup type 2 as the release computes it (clovaai/assembled-cnn utils/data_util.py `mixup` with
keep_batch_size=True, commit 45bb83bca16c0f3607135c8973a125b53b0f5626)."""
from __future__ import annotations

import torch

from finegrain.train.mixup import Mixup, mixed_one_hot, release_type2_pairs


def release_type2(x: torch.Tensor, y: torch.Tensor, lam1: torch.Tensor, lam2: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's graph in torch: split in halves, mix pairwise, then with the reversed second half."""
    x1, x2 = torch.chunk(x, 2)
    y1, y2 = torch.chunk(y, 2)
    shape = (-1, 1, 1, 1)
    mixed_x1 = lam1.view(shape) * x1 + (1 - lam1.view(shape)) * x2
    mixed_y1 = lam1[:, None] * y1 + (1 - lam1[:, None]) * y2
    x3, y3 = torch.flip(x2, [0]), torch.flip(y2, [0])
    mixed_x2 = lam2.view(shape) * x1 + (1 - lam2.view(shape)) * x3
    mixed_y2 = lam2[:, None] * y1 + (1 - lam2[:, None]) * y3
    return torch.cat([mixed_x1, mixed_x2]), torch.cat([mixed_y1, mixed_y2])


def test_type2_pairs_halves_then_the_reversed_half() -> None:
    first, partner = release_type2_pairs(6)
    assert (first.tolist(), partner.tolist()) == ([0, 1, 2, 0, 1, 2], [3, 4, 5, 5, 4, 3])
    first, partner = release_type2_pairs(7)  # an odd batch: the last sample trains unmixed
    assert (first.tolist(), partner.tolist()) == ([0, 1, 2, 0, 1, 2, 6], [3, 4, 5, 5, 4, 3, 6])


def test_type2_images_and_targets_equal_the_releases() -> None:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(8, 3, 5, 5, generator=generator), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    batch = Mixup(2, 0.2, seed=11)(images, labels, torch.arange(8), step=4)
    lam1, lam2 = batch.lam[:4], batch.lam[4:]
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    expected_images, expected_targets = release_type2(images, one_hot, lam1, lam2)
    assert torch.allclose(batch.images, expected_images, atol=1e-6)
    targets = mixed_one_hot(batch.labels, 5, batch.partner_labels, batch.lam)
    assert torch.allclose(targets, expected_targets, atol=1e-6)
    assert batch.indices.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert batch.partner_indices.tolist() == [4, 5, 6, 7, 7, 6, 5, 4]
