"""The CPU fast paths of pretrain/batch_augment.py against their plain formulations, bit for bit.

Each fast path (cached per-crop resize taps, mask-based hue branch, remainder-free
hue triangle, blur groups by box width, run-wise row scatter, materialised
normalisation shift) computes the same floats as the straightforward code it
replaced; the references below are that code. Their distance to PIL is
tests/test_batch_augment.py's subject.
"""
import random

import pytest
import torch

import pretrain.batch_augment as ba
from pretrain.augment import random_resized_crop_box
from pretrain.batch_augment import (
    FRESH,
    Scratch,
    box_blur_kernels,
    box_half_widths,
    crop_taps,
    gaussian_blur,
    on_rows,
    resample_taps,
    resize_crops,
    rotate_hue,
    source_planes,
)

CPU = torch.device("cpu")


# ---------------------------------------------------------------- resize taps
def reference_taps(lengths, size, flips, vertical):
    """The per-crop taps as the batched computation gives them: `resample_taps` of all crops at once,
    mirrored, cut to each crop's last column with a nonzero weight, channel offsets c length."""
    length = torch.tensor(lengths)
    index, weight = resample_taps(torch.zeros_like(length), length, size)
    flip = torch.tensor(flips)[:, None, None]
    index, weight = torch.where(flip, index.flip(1), index), torch.where(flip, weight.flip(1), weight)
    taps = ((weight != 0).any(1).int().cumsum(1).argmax(1) + 1).tolist()
    weight = weight / 255 if vertical else weight
    return [((index[n, :, :k] + lengths[n] * torch.arange(3)[:, None, None]).reshape(-1),
             weight[n, :, :k].repeat(3, 1).reshape(-1), k) for n, k in enumerate(taps)]


@pytest.mark.parametrize("size", [24, 96])
@pytest.mark.parametrize("vertical", [False, True])
def test_crop_taps_cold_warm_and_fresh_agree_with_the_batched_taps(size, vertical):
    rng = random.Random(size)
    lengths = [rng.randint(1, 300) for _ in range(20)] + [7, 7, size, 1]
    flips = [rng.random() < 0.5 for _ in lengths] if not vertical else [False] * len(lengths)
    kept = Scratch(keep=True)
    expected = reference_taps(lengths, size, flips, vertical)
    for scratch in (kept, kept, FRESH):  # cold, then warm (every key cached), then no cache
        for (rows, weights, offsets), (want_rows, want_weights, k) in zip(
                crop_taps(lengths, size, flips, vertical, scratch), expected):
            assert torch.equal(rows, want_rows) and torch.equal(weights, want_weights)
            assert torch.equal(offsets, torch.arange(0, 3 * size * k, k))
    assert len(kept.taps) == len(set(zip(lengths, flips))) and not FRESH.taps
    # the cache is a cache: least recently used entries go beyond TAPS_CACHE_BYTES, results stay
    small = Scratch(keep=True)
    budget, ba.TAPS_CACHE_BYTES = ba.TAPS_CACHE_BYTES, 1
    try:
        for _ in range(2):
            found = crop_taps(lengths, size, flips, vertical, small)
            assert len(small.taps) <= len(set(zip(lengths, flips)))
            for (rows, weights, _), (want_rows, want_weights, _) in zip(found, expected):
                assert torch.equal(rows, want_rows) and torch.equal(weights, want_weights)
        crop_taps([lengths[0]], size, [flips[0]], vertical, small)
        assert len(small.taps) == 1 and small.taps_bytes == 12 * next(iter(small.taps.values()))[0].numel()
    finally:
        ba.TAPS_CACHE_BYTES = budget


def test_per_crop_resize_is_the_same_with_and_without_the_taps_cache():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 70, 90), dtype=torch.uint8)
    rng = random.Random(1)
    boxes = torch.tensor([random_resized_crop_box(rng, 90, 70, (0.05, 1.0)) for _ in range(9)])
    owner, flips = torch.arange(9) % 3, torch.arange(9) % 2 == 0
    planes = source_planes(images, dtype=torch.uint8)
    kept = Scratch(keep=True)
    for size in (16, 40):
        fresh = resize_crops(planes, owner, boxes, flips, size, per_crop=True)
        cold = resize_crops(planes, owner, boxes, flips, size, per_crop=True, scratch=kept)
        warm = resize_crops(planes, owner, boxes, flips, size, per_crop=True, scratch=kept)
        whole = resize_crops(source_planes(images), owner, boxes, flips, size, per_crop=False)
        assert torch.equal(fresh, cold) and torch.equal(cold, warm)
        assert torch.allclose(fresh, whole, atol=1e-5)  # the all-at-once route: other tap counts, same sums


def test_per_crop_resize_reads_planes_at_an_offset():
    # the per-crop loop addresses the planes, region and tables by storage offsets (as_strided)
    torch.manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 30, 40), dtype=torch.uint8)
    planes = source_planes(images, dtype=torch.uint8)
    shifted = torch.empty(planes.numel() + 17, dtype=torch.uint8)[17:].view(planes.shape).copy_(planes)
    boxes = torch.tensor([[2, 3, 20, 30], [0, 0, 30, 40], [5, 9, 11, 7]])
    owner, flips = torch.tensor([0, 1, 1]), torch.tensor([False, True, False])
    assert torch.equal(resize_crops(shifted, owner, boxes, flips, 12, per_crop=True),
                       resize_crops(planes, owner, boxes, flips, 12, per_crop=True))


# ---------------------------------------------------------------- hue
def where_rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`rotate_hue` as selections: the branch by where() on bool masks, the triangle with remainder."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    top, bottom = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    chroma = top - bottom
    red, green = r == top, g == top
    sixths = torch.where(red, g - b, torch.where(green, b - r, r - g)) / chroma.clamp(min=1e-12)
    turn = (shift * 6).float().view(-1, 1, 1, 1)
    sixths = sixths + torch.where(red, turn, torch.where(green, turn + 2, turn + 4))
    u = (sixths + torch.tensor([6.0, 4.0, 2.0]).view(1, 3, 1, 1)).remainder(6).sub(3).abs().sub(1).clamp(0, 1)
    return torch.addcmul(bottom, u, chroma)


def hue_inputs(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.rand(12, 3, 10, 10)
    x[:3, :, :3] = x[:3, :1, :3]  # gray pixels: C = 0
    x[3:6, 1, 3:6] = x[3:6, 0, 3:6]  # r = g: ties go to r
    x[6:9, 2, 6:] = x[6:9, 1, 6:]  # g = b
    x[9:, :, :2] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # the extremes of the hue range
    x[9:, :, 2:4] = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    x[9:, :, 4:6] = torch.tensor([1.0, 0.0, 1.0 - 2**-24]).view(1, 3, 1, 1)
    return x


@pytest.mark.parametrize("largest", [0.1, 1 / 6, 0.5])  # up to 1/6 turn: no remainder; beyond: remainder
def test_mask_based_hue_rotation_is_the_where_based_one(largest):
    for seed in range(3):
        x = hue_inputs(seed)
        shift = torch.linspace(-largest, largest, len(x), dtype=torch.float64)
        shift = torch.trunc(shift * 255) / 255 if largest < 0.5 else shift
        for scratch in (FRESH, Scratch(keep=True)):
            assert torch.equal(rotate_hue(x.clone(), shift, scratch), where_rotate_hue(x, shift))


# ---------------------------------------------------------------- blur, rows, normalisation
def test_box_half_widths_are_the_kernels_half_widths():
    radius = torch.cat([torch.linspace(0.1, 6.0, 200, dtype=torch.float64), torch.tensor([2**0.5, 6**0.5])])
    for r, half in zip(radius, box_half_widths(radius)):
        assert box_blur_kernels(r[None]).shape[1] == 2 * int(half) + 3


def test_blur_in_groups_of_one_box_width_is_the_blur_of_all():
    # `BatchMultiCrop.augment` blurs crops grouped by L: narrower kernels than the chunk's widest, the same floats
    torch.manual_seed(4)
    x = torch.rand(10, 3, 18, 22)
    radius = torch.tensor([0.1, 1.9, 0.7, 1.4, 1.42, 2.0, 0.3, 1.0, 3.5, 0.5], dtype=torch.float64)
    chosen = torch.tensor([True, True, True, False, True, True, True, True, True, False])
    together = on_rows(x.clone(), chosen, gaussian_blur, radius)
    grouped = x.clone()
    half = box_half_widths(radius)
    assert len(half[chosen].unique()) == 3
    for width in half[chosen].unique().tolist():
        grouped = on_rows(grouped, chosen & (half == width), gaussian_blur, radius, scratch=Scratch(keep=True))
    assert torch.equal(grouped, together)


@pytest.mark.parametrize("mask", ["none", "one", "runs", "all_but_ends", "all"])
def test_on_rows_copies_back_runs_of_rows(mask):
    torch.manual_seed(5)
    x = torch.rand(9, 3, 4, 4)
    chosen = {"none": torch.zeros(9, dtype=torch.bool), "one": torch.arange(9) == 4,
              "runs": torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool),
              "all_but_ends": (torch.arange(9) > 0) & (torch.arange(9) < 8),
              "all": torch.ones(9, dtype=torch.bool)}[mask]
    value = torch.arange(9.0)

    def op(rows, per_row, scratch):
        return rows.mul_(2).add_(per_row.view(-1, 1, 1, 1))
    expected = x.clone()
    expected[chosen] = x[chosen] * 2 + value[chosen].view(-1, 1, 1, 1)
    assert torch.equal(on_rows(x.clone(), chosen, op, value, scratch=Scratch(keep=True)), expected)


def test_expanded_shift_normalises_like_the_broadcast_one():
    scratch = Scratch(keep=True)
    scale = 1 / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    shift = -torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * scale
    for count in (5, 3, 7):  # shrinks to a prefix of the kept block, grows when larger
        x = torch.rand(count, 3, 8, 8)
        full = scratch.expanded("shift8", shift, x.shape)
        assert full.shape == x.shape and full.is_contiguous() and torch.equal(full, shift.expand_as(x))
        assert torch.equal(torch.addcmul(full, x, scale), torch.addcmul(shift, x, scale))
    assert scratch.expanded("shift8", shift, (2, 3, 8, 8)).data_ptr() == scratch.buffers["shift8"].data_ptr()
    assert FRESH.expanded("shift8", shift, (2, 3, 8, 8)).shape == (2, 3, 8, 8) and not FRESH.buffers
