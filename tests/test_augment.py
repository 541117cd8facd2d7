"""Multi-crop: sizes, crop-box statistics, determinism per (seed, epoch, index); the sampler."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, random_resized_crop_box, sample_rng
from pretrain.sampler import ShardedSampler


def test_crop_box_area_and_ratio_within_bounds():
    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(rng, 200, 150, (0.05, 0.4))
        assert 0 <= top and top + h <= 150 and 0 <= left and left + w <= 200
        # rounding of the sides allows a little slack around the nominal bounds
        assert 0.04 <= h * w / (200 * 150) <= 0.42
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_crop_box_falls_back_to_centre_crop():
    # a 1000x10 image cannot host a 3/4..4/3 crop of >= 90% area: centre crop with the ratio clamped
    top, left, h, w = random_resized_crop_box(random.Random(0), 1000, 10, (0.9, 1.0))
    assert (h, w) == (10, round(10 * 4 / 3)) and left == (1000 - w) // 2 and top == 0


def test_multicrop_sizes_and_normalisation():
    aug = MultiCropAugmentation(32, 16, n_local=3)
    assert aug.ncrops == 5
    black = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
    crops = aug(black, random.Random(0))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    # black stays black through crop, flip, jitter, grayscale and blur (the first global
    # crop is never solarized): every pixel is the normalised zero
    zero = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))[:, None, None]
    assert torch.allclose(crops[0], zero.expand(3, 32, 32), atol=1e-6)


def test_solarization_only_on_second_global_crop():
    # a black image: solarize (invert >= 128) never triggers, a white one always inverts.
    aug = MultiCropAugmentation(16, 8, n_local=2)
    assert [r.solarize_p for r in aug.recipes] == [0.0, 0.2, 0.0, 0.0]
    assert [r.blur_p for r in aug.recipes] == [1.0, 0.1, 0.5, 0.5]
    white = Image.fromarray(np.full((24, 24, 3), 255, np.uint8))
    darkest = [min(float(aug(white, sample_rng(0, 0, i))[k].min()) for i in range(60)) for k in range(4)]
    floor = float(((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).max())
    assert darkest[1] < floor + 0.5  # some second global crops came out inverted (near black)
    assert all(d > floor + 1.0 for i, d in enumerate(darkest) if i != 1)


def test_crops_are_a_function_of_seed_epoch_index():
    aug = MultiCropAugmentation(32, 16, n_local=2)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    a = aug(img, sample_rng(3, 1, 7))
    b = aug(img, sample_rng(3, 1, 7))
    c = aug(img, sample_rng(3, 2, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("size,world,batch", [(100, 2, 8), (37, 3, 4), (64, 1, 16)])
def test_sampler_ranks_partition_the_single_process_batches(size, world, batch):
    single = ShardedSampler(size, 1, 0, seed=5)
    single.set_epoch(2)
    single_order = [index for _, index in single]
    ranks = []
    for rank in range(world):
        sampler = ShardedSampler(size, world, rank, seed=5)
        sampler.set_epoch(2)
        ranks.append([index for _, index in sampler])
    steps = len(ranks[0]) // batch
    for step in range(steps):
        union = sorted(i for r in ranks for i in r[step * batch:(step + 1) * batch])
        assert union == sorted(single_order[step * batch * world:(step + 1) * batch * world])
    # resuming at a step skips exactly that many batches
    sampler = ShardedSampler(size, world, world - 1, seed=5)
    sampler.set_epoch(2, start_step=1, batch_size=batch)
    assert [index for _, index in sampler] == ranks[-1][batch:]


def test_blur_radius_range_is_configurable():
    # identical random streams; only the blur radius differs, so only the blurred crops differ
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    sharp = MultiCropAugmentation(32, 16, n_local=0, blur_radius=(0.0, 0.0))(img, sample_rng(0, 0, 3))
    blurred = MultiCropAugmentation(32, 16, n_local=0, blur_radius=(2.0, 2.0))(img, sample_rng(0, 0, 3))

    def high_frequency(x):
        return (x[:, 1:, :] - x[:, :-1, :]).abs().mean().item()

    assert high_frequency(blurred[0]) < 0.5 * high_frequency(sharp[0])  # global crop 1 is always blurred
