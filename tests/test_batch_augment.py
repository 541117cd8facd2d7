"""The batched multi-crop (pretrain/batch_augment.py) against the PIL path, op by op and whole.

Differences are measured in uint8 levels (1/255). PIL computes every op in
uint8, so each tolerance below is the rounding PIL does in that op, stated
where it is asserted; the batched path computes in float.
"""
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from test_trainer import TINY, assert_same_training_state, cli_args, tiny_cfg

from bench.augment_throughput import photo_like
from common.errors import UserError, run_cli
from data.imagefolder import ImageFolder
from data.suite_classification import render_object_image
from pretrain.augment import (
    IMAGENET_STD,
    DecodedCropDataset,
    MultiCropAugmentation,
    collate_decoded,
    pack_params,
    random_resized_crop_box,
    rotate_hue_yiq,
    sample_rng,
)
from pretrain.batch_augment import (
    FRESH,
    BatchMultiCrop,
    Scratch,
    color_jitter,
    gaussian_blur,
    invert,
    luma,
    on_rows,
    padded_groups,
    resize_crops,
    rotate_hue,
    solarize,
    source_planes,
    to_gray,
)
from pretrain.checkpoint import safe_load
from pretrain.config import TrainConfig
from pretrain.distributed import DistInfo
from pretrain.sampler import ShardedSampler
from pretrain.train import main as train_main
from pretrain.trainer import Trainer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # cuda: skipped without a GPU (conftest)
PIL_ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def suite_image(size: int = 64) -> Image.Image:
    return render_object_image(np.random.default_rng(3), 4, size)[0]


def photo(width: int = 120, height: int = 90, seed: int = 5) -> Image.Image:
    return photo_like(np.random.default_rng(seed), width, height)


IMAGES = {"suite": suite_image(), "photo": photo()}


def levels(batched: torch.Tensor, pil: list) -> torch.Tensor:
    """batched (N, 3, S, S) in [0, 1] minus the PIL images, in uint8 levels."""
    return (batched.cpu() - torch.stack([TF.to_tensor(image) for image in pil])) * 255


def as_batch(image: Image.Image, count: int = 1) -> torch.Tensor:
    return TF.to_tensor(image)[None].expand(count, -1, -1, -1).contiguous()


# ---------------------------------------------------------------- one op at a time
@pytest.mark.parametrize("name", IMAGES)
def test_resize_matches_pil_bicubic(name):
    image = IMAGES[name]
    rng = random.Random(0)
    boxes = [random_resized_crop_box(rng, image.width, image.height, (0.05, 1.0)) for _ in range(24)]
    flips = [i % 2 == 1 for i in range(24)]
    size = 40
    images = TF.pil_to_tensor(image)[None]
    out = resize_crops(source_planes(images), torch.zeros(24, dtype=torch.long), torch.tensor(boxes),
                       torch.tensor(flips), size)
    assert out.shape == (24, 3, size, size)
    crops = [image.crop((left, top, left + w, top + h)) for top, left, h, w in boxes]
    assert min(w for _, _, _, w in boxes) < size < max(w for _, _, _, w in boxes)  # up- and downsampling
    # PIL in our order, horizontal then vertical, uint8 in between: the two differ by PIL's two roundings
    # (0.5 level, the first one through the vertical weights, sum |w| < 1.3) -> at most 1.15 levels
    two_pass = [crop.resize((size, crop.height), Image.BICUBIC).resize((size, size), Image.BICUBIC) for crop in crops]
    two_pass = [ImageOps.mirror(c) if f else c for c, f in zip(two_pass, flips)]
    diff = levels(out, two_pass)
    assert diff.abs().max() <= 1.15 and diff.abs().mean() < 0.35
    # PIL's own resize: Pillow 13 runs the vertical pass first for some crops, which moves only the pixels
    # where the first pass overshoots [0, 255] and is clipped
    direct = [ImageOps.mirror(c) if f else c for c, f in
              zip([crop.resize((size, size), Image.BICUBIC) for crop in crops], flips)]
    diff = levels(out, direct)
    assert diff.abs().mean() < 0.35 and (diff.abs() > 1.15).float().mean() < 0.005


def test_resize_per_crop_and_all_at_once_agree():
    # the CPU's default (one crop at a time, only its rows into the vertical pass) against the one-call path
    images = torch.stack([TF.pil_to_tensor(photo()), TF.pil_to_tensor(photo(seed=6))])
    rng = random.Random(1)
    boxes = [random_resized_crop_box(rng, 120, 90, (0.05, 1.0)) for _ in range(10)]
    owner, flips = torch.tensor([i % 2 for i in range(10)]), torch.tensor([i % 3 == 0 for i in range(10)])
    for size in (24, 64):
        args = (source_planes(images), owner, torch.tensor(boxes), flips, size)
        assert torch.allclose(resize_crops(*args, per_crop=True), resize_crops(*args, per_crop=False), atol=1e-6)


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("op,low,high", [(0, 0.6, 1.4), (1, 0.6, 1.4), (2, 0.2, 1.8)])
def test_blends_match_pil(name, op, low, high):
    image = IMAGES[name]
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(8, 1)
    factors[:, op] = torch.linspace(low, high, 8, dtype=torch.float64)
    order = torch.tensor([op] + [k for k in range(4) if k != op]).repeat(8, 1)
    out = color_jitter(as_batch(image, 8), torch.ones(8, dtype=torch.bool), factors, order)
    diff = levels(out, [PIL_ADJUST[op](image, float(f)) for f in factors[:, op]])
    # PIL's blend truncates towards zero: batched - PIL lies in [0, 1) level for brightness; contrast and
    # saturation blend with a rounded target (mean luma / luma image, 0.5 level), scaled by |1 - f| <= 0.8
    bound = 1.0 if op == 0 else 1.0 + 0.5 * max(abs(1 - low), abs(1 - high))
    assert diff.min() >= (-1e-4 if op == 0 else -bound) and diff.max() <= bound + 1e-4
    assert 0.3 < diff.mean() < 0.7  # the truncation's half-level bias, which the float path does not have


@pytest.mark.parametrize("name", IMAGES)
def test_hue_matches_pil(name):
    image = IMAGES[name]
    shifts = torch.linspace(-0.5, 0.5, 9, dtype=torch.float64)
    factors = torch.zeros(9, 4, dtype=torch.float64)
    factors[:, :3], factors[:, 3] = 1.0, shifts
    out = color_jitter(as_batch(image, 9), torch.ones(9, dtype=torch.bool), factors,
                       torch.tensor([3, 0, 1, 2]).repeat(9, 1))
    diff = levels(out, [TF.adjust_hue(image, float(d)) for d in shifts]).abs()
    # PIL converts to 8-bit HSV: hue and saturation truncated to 1/255 (a hue step moves a channel by up to
    # 6 C / 255 levels, C the chroma), its shift wraps modulo 256 steps instead of 255; its own round trip
    # at shift 0 already moves pixels by up to 5 levels
    round_trip = levels(as_batch(image), [TF.adjust_hue(image, 0.0)]).abs()
    assert round_trip.max() >= 1.0
    assert diff.max() <= 12.0 and diff.mean() < 1.0 and diff.mean() < 2 * round_trip.mean() + 0.1


def test_hue_rotation_in_float():
    # rotate_hue works in place: each call gets a copy
    primaries = torch.eye(3).view(3, 3, 1, 1)  # red, green, blue pixels
    third = rotate_hue(primaries.clone(), torch.full((3,), 1 / 3))
    assert torch.allclose(third, primaries.roll(1, 1), atol=1e-6)  # red -> green -> blue -> red
    x = torch.rand(4, 3, 16, 16)
    back = rotate_hue(rotate_hue(x.clone(), torch.tensor([0.1, -0.2, 0.45, 0.0])),
                      torch.tensor([-0.1, 0.2, -0.45, 0.0]))
    assert torch.allclose(back, x, atol=1e-5)
    gray = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8)
    assert torch.allclose(rotate_hue(gray.contiguous(), torch.tensor([0.3, -0.4])), gray)  # no chroma, no change


def hsv_hue_reference(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The textbook HSV round trip in float64: RGB -> (h, s, v), h += shift, -> RGB (colorsys's formulas)."""
    x = x.double()
    top, bottom = x.amax(1), x.amin(1)
    chroma = top - bottom
    r, g, b = x.unbind(1)
    safe = chroma.clamp(min=1e-300)
    rc, gc, bc = (top - r) / safe, (top - g) / safe, (top - b) / safe
    h = torch.where(r == top, bc - gc, torch.where(g == top, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(chroma > 0, h / 6 + shift.double().view(-1, 1, 1), 0.0).remainder(1.0) * 6
    sector, f = h.floor(), h - h.floor()
    p, q, t = bottom, top - chroma * f, bottom + chroma * f
    choices = [(top, t, p), (q, top, p), (p, top, t), (p, q, top), (t, p, top), (top, p, q)]
    out = torch.zeros_like(x)
    for k, channels in enumerate(choices):
        out = torch.where((sector == k)[:, None], torch.stack(channels, 1), out)
    return out


def test_hue_rotation_matches_a_float64_hsv_round_trip():
    # the in-place float32 formula against colorsys-style HSV in float64: only float32 roundings apart
    torch.manual_seed(1)
    x = torch.rand(16, 3, 24, 24)
    x[:2, :, :4] = x[:2, :1, :4]  # some gray pixels, and ties between channels
    x[2:4, 1, 4:8] = x[2:4, 0, 4:8]
    shift = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)
    assert (rotate_hue(x.clone(), shift) - hsv_hue_reference(x, shift)).abs().max() < 1e-5


def test_per_crop_resize_reads_uint8_or_float_planes_alike():
    # the CPU pipeline keeps uint8 planes: each crop's region is converted to float when it is copied
    images = torch.stack([TF.pil_to_tensor(photo()), TF.pil_to_tensor(photo(seed=6))])
    rng = random.Random(2)
    boxes = torch.tensor([random_resized_crop_box(rng, 120, 90, (0.05, 1.0)) for _ in range(8)])
    owner, flips = torch.tensor([i % 2 for i in range(8)]), torch.tensor([i % 3 == 0 for i in range(8)])
    for size in (24, 64):
        floats = resize_crops(source_planes(images), owner, boxes, flips, size, per_crop=True)
        out = torch.empty(8, 3, size, size)
        uint8 = resize_crops(source_planes(images, dtype=torch.uint8), owner, boxes, flips, size, per_crop=True,
                             scratch=Scratch(keep=True), out=out)
        assert uint8 is out and torch.equal(uint8, floats)


def test_scratch_reuses_and_grows():
    scratch = Scratch(keep=True)
    a = scratch("a", (2, 3), torch.device("cpu"))
    assert scratch("a", (3, 2), torch.device("cpu")).data_ptr() == a.data_ptr()  # same block, any shape
    assert scratch("a", (4, 4), torch.device("cpu")).shape == (4, 4)  # grown
    assert scratch("b", (2,), torch.device("cpu"), torch.bool).dtype == torch.bool
    FRESH("a", (2, 3), torch.device("cpu"))
    assert not FRESH.buffers  # the default keeps nothing: every buffer a fresh tensor


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_steps_with_scratch_match_fresh_buffers(device):
    # the CPU pipeline's reused buffers (Scratch(keep=True)) against fresh ones, op by op, on any device
    torch.manual_seed(2)
    x = torch.rand(6, 3, 20, 20, device=device)
    factors = torch.tensor([[1.2, 0.7, 1.3, 0.08]] * 6, dtype=torch.float64)
    order = torch.stack([torch.randperm(4) for _ in range(6)])
    applied = torch.tensor([True, True, False, True, True, True])
    chosen = torch.tensor([True, False, True, True, False, True])
    radius = torch.linspace(0.1, 2.0, 6, dtype=torch.float64)
    kept = Scratch(keep=True)
    for _ in range(2):  # the second round reuses the first round's buffers
        results = []
        for scratch in (FRESH, kept):
            y = color_jitter(x.clone(), applied, factors, order, scratch=scratch)
            y = on_rows(y, chosen, to_gray, scratch=scratch)
            y = on_rows(y, ~chosen, gaussian_blur, radius, scratch=scratch)
            results.append(on_rows(y, chosen, solarize, scratch=scratch))
        assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", IMAGES)
def test_grayscale_solarize_and_invert_match_pil(name):
    image = IMAGES[name]
    gray = luma(as_batch(image)).expand(1, 3, -1, -1)
    diff = levels(gray, [ImageOps.grayscale(image).convert("RGB")])
    assert diff.abs().max() <= 0.5 + 1e-3  # PIL rounds the luma to a level
    solarized = solarize(as_batch(image))
    assert levels(solarized, [ImageOps.solarize(image, threshold=128)]).abs().max() < 1e-3  # exact on levels
    inverted = invert(as_batch(image))
    assert levels(inverted, [ImageOps.invert(image)]).abs().max() < 1e-3


@pytest.mark.parametrize("name", IMAGES)
def test_blur_matches_pil_gaussian_blur(name):
    image = IMAGES[name]
    radii = torch.tensor([0.015, 0.1, 0.3, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    out = gaussian_blur(as_batch(image, len(radii)), radii)
    diff = levels(out, [image.filter(ImageFilter.GaussianBlur(radius=float(r))) for r in radii]).abs()
    # PIL rounds to a level after each of its six box passes (three per axis)
    assert diff.max() <= 3.0 and diff.mean() < 0.7


def test_blur_radius_is_the_standard_deviation():
    impulse = torch.zeros(3, 3, 41, 41)
    impulse[:, :, 20, 20] = 1.0
    radii = torch.tensor([0.5, 1.3, 2.0], dtype=torch.float64)
    out = gaussian_blur(impulse, radii)
    offsets = torch.arange(41, dtype=torch.float64) - 20
    row = out[:, 0, 20].double() / out[:, 0, 20].double().sum(-1, keepdim=True)
    assert torch.allclose((row * offsets**2).sum(-1), radii**2, rtol=1e-4)  # PIL's radius is sigma
    assert torch.allclose(out.sum((2, 3)), torch.ones(3, 3))  # mass kept
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([2.0])), flat)  # edges repeat, no darkening


# ---------------------------------------------------------------- the whole pipeline
def pil_and_batched(augmentation: MultiCropAugmentation, images: list, device: str = "cpu", **options):
    params = [augmentation.draw(img.width, img.height, sample_rng(0, 1, i)) for i, img in enumerate(images)]
    pil = [augmentation(img, sample_rng(0, 1, i)) for i, img in enumerate(images)]
    batch = collate_decoded([(TF.pil_to_tensor(img), p) for img, p in zip(images, params)])
    crops = BatchMultiCrop.like(augmentation, **options).on_device(batch, torch.device(device))
    return pil, crops, params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", [dict(global_size=64, local_size=32, n_local=4),
                                      dict(global_size=32, local_size=16, n_local=4, local_scale=(0.1, 0.4),
                                           saturation=0.8, hue=0.5, grayscale_p=0.5, blur_radius=(0.015, 0.3)),
                                      dict(global_size=32, local_size=16, n_local=4, local_scale=(0.1, 0.4),
                                           saturation=0.8, hue=0.5, grayscale_p=0.5, blur_radius=(0.015, 0.3),
                                           hue_space="yiq"),
                                      dict(global_size=32, local_size=16, n_local=4, grayscale_p=0.5,
                                           hue_space="yiq", local_invert_p=0.5)],
                         ids=["paper-like", "demo-hsv", "demo-yiq", "demo-invert"])
def test_full_pipeline_matches_pil(settings, device):
    augmentation = MultiCropAugmentation(**settings)
    images = [photo(), suite_image(), photo(77, 101, seed=8), suite_image(48)] * 3  # mixed sizes: padding
    pil, crops, _ = pil_and_batched(augmentation, images, device)
    assert [tuple(c.shape) for c in crops] == [(12, 3, recipe.size, recipe.size) for recipe in augmentation.recipes]
    std = torch.tensor(augmentation.std).view(3, 1, 1)
    diff = torch.cat([((crops[k][i].cpu() - pil[i][k]) * std * 255).flatten()
                      for i in range(len(images)) for k in range(augmentation.ncrops)]).abs()
    # the ops' PIL roundings add up: up to four jitter truncations (half a level each on average), the
    # 8-bit HSV of hue, six blur roundings; rare pixels near saturated hues reach the hue bound
    assert diff.mean() < 2.0 and diff.quantile(0.99) < 7.0 and diff.max() < 20.0


def test_yiq_hue_rotation_keeps_luma_and_turns_the_chroma():
    torch.manual_seed(0)
    x = 0.4 + 0.2 * torch.rand(4, 3, 8, 8)  # mid-range colours: every rotation stays inside [0, 1]
    turns = torch.tensor([0.0, 0.25, 0.5, 1.0])
    rotated = rotate_hue_yiq(x, turns)
    assert torch.allclose(luma(rotated), luma(x), atol=1e-5)  # grayscale unchanged
    assert torch.allclose(rotated[0], x[0], atol=1e-5) and torch.allclose(rotated[3], x[3], atol=1e-5)
    # half a turn negates the chroma: x' = 2 Y - x channel-wise (M^-1 maps (Y, 0, 0) to (Y, Y, Y))
    assert torch.allclose(rotated[2], (2 * luma(x[2:3]) - x[2:3])[0], atol=1e-5)
    # a quarter turn twice is half a turn
    twice = rotate_hue_yiq(rotate_hue_yiq(x[1:2], turns[1:2]), turns[1:2])
    assert torch.allclose(twice, rotate_hue_yiq(x[1:2], torch.tensor([0.5])), atol=1e-5)
    with pytest.raises(UserError, match="unknown hue space 'lab'"):
        MultiCropAugmentation(hue_space="lab")


def test_batch_composition_and_chunking_do_not_change_a_crop():
    augmentation = MultiCropAugmentation(48, 24, n_local=3)
    images = [photo(), suite_image(), photo(60, 140, seed=2)]
    _, together, params = pil_and_batched(augmentation, images)
    _, chunked, _ = pil_and_batched(augmentation, images, chunk_bytes=1)  # one crop per chunk
    alone = BatchMultiCrop.like(augmentation)(TF.pil_to_tensor(images[2])[None], pack_params([params[2]]))
    for k in range(augmentation.ncrops):
        assert torch.allclose(together[k], chunked[k], atol=1e-5)
        assert torch.allclose(together[k][2], alone[k][0], atol=1e-5)


def test_cpu_pipeline_matches_the_general_one():
    # the GPU's route run on the CPU: float planes, all crops of a chunk resized in one call, then `augment`
    augmentation = MultiCropAugmentation(48, 24, n_local=3, grayscale_p=0.5, blur_radius=(0.1, 2.0))
    images = [photo(), suite_image(), photo(60, 140, seed=2), photo(seed=4)]
    params = [augmentation.draw(img.width, img.height, sample_rng(0, 3, i)) for i, img in enumerate(images)]
    batch = collate_decoded([(TF.pil_to_tensor(img), p) for img, p in zip(images, params)])
    batched = BatchMultiCrop.like(augmentation)
    fast = batched(batch.padded(), batch.params)
    source = source_planes(batch.padded())
    for slot, size in enumerate(augmentation.sizes):
        p = {name: value[slot] for name, value in batch.params.items()}
        general = torch.empty(len(images), 3, size, size)
        for part in (slice(0, 3), slice(3, 4)):
            chunk = {name: value[part] for name, value in p.items()}
            x = resize_crops(source, torch.arange(len(images))[part], chunk["box"], chunk["flip"], size, per_crop=False)
            batched.augment(x, chunk, general[part])
        assert torch.allclose(fast[slot], general, atol=1e-5)


def test_one_batch_multicrop_serves_batches_of_any_shape():
    # the CPU keeps the float source planes for the next batch: a batch of another shape must not see them
    augmentation = MultiCropAugmentation(48, 24, n_local=2)
    reused = BatchMultiCrop.like(augmentation)
    for images in ([photo(), photo(60, 140, seed=2)], [suite_image(), suite_image(48)], [photo(), photo(seed=9)]):
        params = [augmentation.draw(img.width, img.height, sample_rng(0, 2, i)) for i, img in enumerate(images)]
        batch = collate_decoded([(TF.pil_to_tensor(img), p) for img, p in zip(images, params)])
        fresh = BatchMultiCrop.like(augmentation)(batch.padded(), batch.params)
        for a, b in zip(reused(batch.padded(), batch.params), fresh):
            assert torch.equal(a, b)


def test_padded_groups_by_hand():
    sizes = [(10, 10), (100, 100), (10, 20), (50, 50)]
    assert padded_groups(sizes, 4 * 100 * 100) == [[0, 1, 2, 3]]  # all fit: one group, batch order
    # sorted: 0 (10x10), 2 (10x20), 3 (50x50), 1 (100x100); 3 x 50 x 50 = 7500 fits, 4 x 100 x 100 does not
    assert padded_groups(sizes, 7500) == [[0, 2, 3], [1]]
    assert padded_groups(sizes, 7499) == [[0, 2], [3], [1]]
    assert padded_groups(sizes, 1) == [[0], [2], [3], [1]]  # each alone, even over the budget


@pytest.mark.parametrize("device", DEVICES)
def test_crop_images_in_groups_equals_one_padded_batch(device):
    """A batch of very different sizes cropped in padded groups gives the one padded batch's crops."""
    augmentation = MultiCropAugmentation(48, 24, n_local=3, grayscale_p=0.5)
    images = [photo(), suite_image(), photo(60, 140, seed=2), photo(seed=4), suite_image(48)]
    params = [augmentation.draw(img.width, img.height, sample_rng(0, 5, i)) for i, img in enumerate(images)]
    batch = collate_decoded([(TF.pil_to_tensor(img), p) for img, p in zip(images, params)])
    batched = BatchMultiCrop.like(augmentation)
    whole = batched(batch.padded().to(device), batch.params)
    tensors = batch.images(device)
    assert len(padded_groups([tuple(t.shape[1:]) for t in tensors], 3 * 32 * 32)) > 2
    grouped = batched.crop_images(tensors, batch.params, group_pixels=3 * 32 * 32)
    for a, b in zip(grouped, whole, strict=True):
        assert a.device == b.device and torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(batched.on_device(batch, torch.device(device)), whole))


def test_decoded_batch_is_one_tensor_of_pixels():
    images = [TF.pil_to_tensor(photo()), TF.pil_to_tensor(suite_image())]
    batch = collate_decoded([(image, []) for image in images])
    assert batch.pixels.dim() == 1 and batch.pixels.numel() == sum(t.numel() for t in images)
    assert batch.sizes.tolist() == [list(t.shape[1:]) for t in images]
    assert all(torch.equal(a, b) for a, b in zip(batch.images(), images, strict=True))
    padded = batch.padded()
    assert padded.shape == (2, 3, max(t.shape[1] for t in images), max(t.shape[2] for t in images))
    assert torch.equal(padded[1, :, :images[1].shape[1], :images[1].shape[2]], images[1])
    assert padded[1, :, images[1].shape[1]:].eq(0).all() and padded[1, :, :, images[1].shape[2]:].eq(0).all()


# ---------------------------------------------------------------- the random draws
def test_per_crop_probabilities():
    augmentation = MultiCropAugmentation(32, 16, n_local=2, grayscale_p=0.3)
    count = 4000
    drawn = [augmentation.draw(100, 80, sample_rng(7, 0, i)) for i in range(count)]
    packed = pack_params(drawn)  # (crops, images)
    rate = {name: packed[name].double().mean(1) for name in ("flip", "jitter", "grayscale", "blur", "solarize")}
    expected = {"flip": [0.5] * 4, "jitter": [0.8] * 4, "grayscale": [0.3] * 4,
                "blur": [1.0, 0.1, 0.5, 0.5], "solarize": [0.0, 0.2, 0.0, 0.0]}
    for name, probabilities in expected.items():
        for crop, p in enumerate(probabilities):
            tolerance = 4 * (p * (1 - p) / count) ** 0.5  # four binomial standard deviations
            assert abs(rate[name][crop] - p) <= tolerance, (name, crop, float(rate[name][crop]))
    jittered = packed["jitter"]
    first_op = packed["order"][:, :, 0][jittered]
    assert all(abs((first_op == op).double().mean() - 0.25) < 0.02 for op in range(4))  # a uniform order
    for op, (low, high) in enumerate(augmentation.jitter_ranges):
        values = packed["factors"][:, :, op][jittered]
        assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high
    radius = packed["blur_radius"][packed["blur"]]
    assert 0.1 <= radius.min() < 0.11 and 1.99 < radius.max() <= 2.0


def test_inversion_is_drawn_per_local_crop_only_when_asked():
    """local_invert_p > 0: each local crop inverted with that probability, on its own, never a global crop;
    0: no coin is drawn, so every other choice (and the next crop's) is exactly the paper's pipeline's."""
    count = 4000
    plain = MultiCropAugmentation(32, 16, n_local=2)
    inverting = MultiCropAugmentation(32, 16, n_local=2, local_invert_p=0.5)
    packed = pack_params([inverting.draw(100, 80, sample_rng(7, 0, i)) for i in range(count)])
    rates = packed["invert"].double().mean(1).tolist()
    assert rates[:2] == [0.0, 0.0]
    assert all(abs(rate - 0.5) <= 4 * (0.25 / count) ** 0.5 for rate in rates[2:])
    both = packed["invert"][2] & packed["invert"][3]  # the two local crops: independent coins
    assert abs(float(both.double().mean()) - 0.25) <= 4 * (0.25 * 0.75 / count) ** 0.5
    unchanged = [plain.draw(100, 80, sample_rng(7, 0, i)) for i in range(50)]
    assert not any(p.invert for crops in unchanged for p in crops)
    first = inverting.draw(100, 80, sample_rng(7, 0, 0))
    assert unchanged[0][:3] == [replace(p, invert=False) for p in first[:3]]  # the coin comes after these
    assert unchanged[0][3] != replace(first[3], invert=False)  # the next local crop's draws shift by one
    with pytest.raises(UserError, match="--local-invert-p 1.5 is not a probability"):
        TrainConfig(local_invert_p=1.5)


def test_params_depend_only_on_seed_epoch_index(tiny_suite):
    augmentation = MultiCropAugmentation(32, 16, n_local=2)
    dataset = DecodedCropDataset(ImageFolder(tiny_suite / "train"), augmentation, seed=4)
    forward = [dataset[(3, i)][1] for i in range(10)]
    backward = [dataset[(3, i)][1] for i in reversed(range(10))][::-1]
    assert forward == backward and forward != [dataset[(4, i)][1] for i in range(10)]

    def batches(workers: int):
        sampler = ShardedSampler(len(dataset), seed=4)
        sampler.set_epoch(3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers,
                                             collate_fn=collate_decoded)
        return list(loader)[:3]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.sizes, b.sizes)
        assert all(torch.equal(a.params[name], b.params[name]) for name in a.params)


# ---------------------------------------------------------------- training
def test_pretrain_on_device_resumes_bit_exact(tiny_suite, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    settings = dict(augment_on="device", epochs=1, saveckp_freq=0)
    Trainer(tiny_cfg(tiny_suite / "train", full, **settings), DistInfo()).fit()
    Trainer(tiny_cfg(tiny_suite / "train", resumed, max_steps=7, **settings), DistInfo()).fit()
    second = Trainer(tiny_cfg(tiny_suite / "train", resumed, **settings), DistInfo()).fit()
    assert second["resumed"] and second["start_iteration"] == 7 and second["iterations"] == 15
    assert safe_load(full / "checkpoint.pth")["args"]["augment_on"] == "device"
    assert_same_training_state(full, resumed)


def test_trainer_batches_agree_between_paths(tiny_suite, tmp_path):
    crops = {}
    for where in ("loader", "device"):
        trainer = Trainer(tiny_cfg(tiny_suite / "train", tmp_path / where, augment_on=where), DistInfo())
        trainer.sampler.set_epoch(1, 2, trainer.cfg.batch_size_per_gpu)  # epoch 1, from step 2
        crops[where] = trainer.crops_on(next(iter(trainer.make_loader())), trainer.device)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert len(crops["device"]) == len(crops["loader"]) == 4
    for loader_crop, device_crop in zip(crops["loader"], crops["device"]):
        assert loader_crop.shape == device_crop.shape
        diff = ((loader_crop - device_crop) * std * 255).abs()
        assert diff.mean() < 2.0 and diff.max() < 20.0  # the full pipeline's bounds (PIL's roundings)


def test_augment_on_flag(tiny_suite, tmp_path, capsys):
    base = {**TINY, "data": tiny_suite / "train", "output_dir": tmp_path / "out", "epochs": 1, "max_steps": 1}
    with pytest.raises(SystemExit) as refused:  # outside the flag's choices: refused at parse time
        run_cli(train_main, ["--preset", "vanilla", *cli_args({**base, "augment_on": "gpu"})])
    assert refused.value.code == 2
    assert "argument --augment-on: invalid choice: 'gpu' (choose from 'auto', 'loader', 'device')" in \
        capsys.readouterr().err
    with pytest.raises(UserError, match="--augment-on 'gpu' is not one of auto, loader, device"):
        tiny_cfg(tiny_suite / "train", tmp_path / "out", augment_on="gpu")  # the config checks it too
    assert run_cli(train_main, ["--preset", "vanilla", *cli_args({**base, "augment_on": "device"})]) == 0
    assert safe_load(tmp_path / "out" / "checkpoint.pth")["args"]["augment_on"] == "device"
