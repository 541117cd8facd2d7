"""Batched multi-crop augmentation on any device: the PIL path's computation, for a whole batch at once.

Input: a uint8 batch of decoded images (B, 3, H, W), each zero-padded at the
bottom/right to the largest image, and every crop's `CropParams`, drawn by
``MultiCropAugmentation.draw`` from ``sample_rng(seed, epoch, index)`` exactly
as the PIL path draws them (packed into tensors by `pack_params`). Output:
the 2 + n_local normalised crops, each (B, 3, S, S) float, as the trainer
expects. Crops of one output size are processed together (in chunks bounded
in memory); every step is a batched tensor op (no Python loop over images or
pixels), in float on [0, 1] where PIL works in uint8, so the two paths differ
by PIL's roundings (tests/test_batch_augment.py states the bounds):

* crop + resize: PIL's antialiased bicubic. Output pixel j of a crop of
  length L resized to S (scale s = L / S) reads the taps x with
  |x + 1/2 - c_j| < 2 max(s, 1), c_j = (j + 1/2) s, weighted by the Keys cubic
  (a = -1/2) at (x + 1/2 - c_j) / max(s, 1) and normalised to sum 1 over the
  taps inside the box. Separable: horizontal pass, clamp to the pixel range,
  vertical pass (Pillow <= 12's order; Pillow 13 runs the vertical pass first
  for crops whose height shrinks more than twice as much as their width,
  which changes only pixels where the first pass overshoots and is clamped).
  Each pass is, for every output row of every crop, a weighted sum of K rows
  of a table (`embedding_bag`); on the CPU both passes run one crop at a time
  on tables of that crop's own pixels (its region, then its intermediate,
  both in cache) with its own K (taps kept per crop length: `crop_taps`),
  each result clamped into place (the intermediate transposed, the second
  straight into the output tensor).
* flip: the horizontal taps of flipped crops are read in reverse order.
* colour jitter, position by position (p = 0..3): the op at position p of
  each jittered crop. Brightness, contrast and saturation are blends
  x <- clamp(t + f (x - t), 0, 1) towards t = 0, the mean luma of the crop,
  and the luma image; hue rotates the HSV hue by d turns (`rotate_hue`), d rounded towards
  zero to PIL's steps of 1/255 turn (no change where that is 0, where PIL
  still makes its lossy 8-bit HSV round trip).
* grayscale: luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2) in all channels.
* invert (not the paper's; local crops, only where ``local_invert_p`` > 0): x -> 1 - x.
* Gaussian blur of radius r (PIL's meaning: the standard deviation): three
  passes per axis of PIL's extended box filter, the box of variance r^2 / 3:
  l = floor((sqrt(4 r^2 + 1) - 1) / 2), a = (2l+1)(l(l+1) - r^2) / (2r^2 - 6(l+1)^2),
  weights 1 on |i| <= l and a on |i| = l + 1, over 2l + 1 + 2a; edge pixels
  repeat, as in PIL.
* solarize: x -> 1 - x where x >= 128/255; normalise: (x - mean) / std.

On the CPU nothing but the outputs (and each crop pass's result, a block of
at most a few hundred KiB that malloc recycles) is allocated per call
(`Scratch`: a fresh block of a few MiB costs more in page faults than most ops
that fill it), and the steps after the resize run in place on chunks of crops
that fit in cache (``CPU_CHUNK_BYTES``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from common.errors import UserError

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodedBatch,
    DecodedCropDataset,
    MultiCropAugmentation,
    MultiCropDataset,
    collate_decoded,
    pad_images,
    rotate_hue_yiq,
)
from .device_decode import DecodeThenCrop, EncodedCropDataset, collate_encoded

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
BLUR_PASSES = 3
HUE_STEPS = 255  # PIL stores hue in uint8: one step is 1/255 turn
CPU_CHUNK_BYTES = 2**22  # crops per chunk on the CPU: 4 MiB of (3, S, S) float crops, about an L2 cache's worth


# ---------------------------------------------------------------- scratch buffers
class Scratch:
    """Named float work buffers: ``scratch(name, shape, device)`` -> a tensor of that shape.

    With ``keep`` (the CPU pipeline) each name's buffer is kept and reused by
    the next call of that name (grown when too small), so no pass allocates:
    a fresh block of a few MiB costs a page fault per 4 KiB on first touch
    (glibc gives such blocks back to the system on free), often more than the
    op that fills it. Without ``keep`` every call is a fresh ``torch.empty``.
    A caller owns a name's contents only until its next request of that name.
    With ``keep`` it also keeps constants (`expanded`) and resize taps per crop
    length (``taps``, `crop_taps`)."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.buffers: dict[str, torch.Tensor] = {}
        self.taps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # `crop_taps`, least recently used first
        self.taps_bytes = 0

    def __call__(self, name: str, shape, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self.buffers.get(name)
        if flat is None or flat.numel() < numel or flat.device != device or flat.dtype != dtype:
            flat = torch.empty(numel, device=device, dtype=dtype)
            if self.keep:
                self.buffers[name] = flat
        return flat[:numel].view(shape)

    def expanded(self, name: str, value: torch.Tensor, shape) -> torch.Tensor:
        """``value`` broadcast to ``shape`` (N, ...), materialised (contiguous). With ``keep`` it is kept
        under ``name`` and refilled only for a larger N or other trailing dims: one name, one value."""
        kept = self.buffers.get(name)
        if (kept is None or len(kept) < shape[0] or kept.shape[1:] != tuple(shape[1:]) or kept.device != value.device
                or kept.dtype != value.dtype):
            kept = value.expand(shape).contiguous()
            if self.keep:
                self.buffers[name] = kept
        return kept[:shape[0]]


FRESH = Scratch()  # no reuse: every buffer a fresh tensor


# ---------------------------------------------------------------- crop + resize
def bicubic_kernel(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic with a = -1/2: (1.5|x| - 2.5)|x|^2 + 1 on |x| < 1,
    -0.5 (|x|^3 - 5|x|^2 + 8|x| - 4) on 1 <= |x| < 2, else 0."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = -0.5 * (((x - 5) * x + 8) * x - 4)
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_taps(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's antialiased bicubic taps along one axis of N crops (CPU, float64).

    ``start``, ``length`` (N,) give each crop's extent on the source axis.
    Returns (index, weight), both (N, size, K): source coordinates (clamped
    into the crop; surplus taps have weight 0) and weights summing to 1.
    """
    scale = length.double() / size
    stretch = scale.clamp(min=1.0)[:, None, None]
    support = 2.0 * stretch
    centre = (torch.arange(size, dtype=torch.float64) + 0.5) * scale[:, None]
    centre = centre[..., None]
    first = torch.floor(centre - support + 0.5).clamp(min=0)
    end = torch.minimum(torch.floor(centre + support + 0.5), length.double()[:, None, None])
    taps = int((end - first).max())
    x = first + torch.arange(taps, dtype=torch.float64)
    weight = bicubic_kernel((x + 0.5 - centre) / stretch) * (x < end)
    weight = weight / weight.sum(-1, keepdim=True)
    index = start[:, None, None] + torch.minimum(x.long(), length[:, None, None] - 1)
    return index, weight.float()


def weighted_rows(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[r] = sum_k weight[r, k] * table[index[r, k]]: (R, K) CPU taps -> (R, table columns)."""
    device = table.device
    return F.embedding_bag(index.to(device), table, per_sample_weights=weight.to(device), mode="sum")


def source_planes(images: torch.Tensor, out: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B * 3, W, H) of ``dtype``: the images' planes transposed,
    so that the horizontal pass reads one table row per (image, channel, column).
    Written into ``out`` where it is given and has that shape and dtype."""
    batch, channels, height, width = images.shape
    shape = (batch * channels, width, height)
    if out is None or out.shape != shape or out.device != images.device or out.dtype != dtype:
        out = torch.empty(shape, device=images.device, dtype=dtype)
    return out.copy_(images.flatten(0, 1).transpose(1, 2))


# embedding_bag's forward kernel (an ATen op without a Python wrapper), and its bag offsets by (rows, taps)
EMBEDDING_BAG = getattr(torch.ops.aten, "_embedding_bag_forward_only", None)
BAG_OFFSETS: dict[tuple[int, int], torch.Tensor] = {}  # (rows, taps) -> arange(0, rows taps, taps)


def bag_offsets(rows: int, taps: int) -> torch.Tensor:
    """arange(0, rows taps, taps): the first tap of each of ``rows`` bags of ``taps`` (kept)."""
    offsets = BAG_OFFSETS.get((rows, taps))
    if offsets is None:
        offsets = BAG_OFFSETS.setdefault((rows, taps), torch.arange(0, rows * taps, taps))
    return offsets


def bags(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`weighted_rows` for CPU taps given flat, R rows of K: ``index``, ``weight`` (R K,), ``offsets``
    `bag_offsets` (R, K). A fresh (R, table columns) tensor, straight from the ATen kernel (its out=
    variant computes the same tensor and then copies it into out, a pass more: the callers clamp it
    into place instead)."""
    if EMBEDDING_BAG is None:
        return weighted_rows(table, index.view(len(offsets), -1), weight.view(len(offsets), -1))
    return EMBEDDING_BAG(table, index, offsets, False, 0, False, weight, False, -1)[0]


TAPS_CACHE_BYTES = 2**26  # a kept `Scratch`'s `crop_taps` entries, least recently used dropped beyond this


def crop_taps(lengths: list[int], size: int, flips: list[bool], vertical: bool,
              scratch: Scratch = FRESH) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One resize pass's taps for each of N crops, on the tables of `resize_crops`'s per-crop path:
    crop n's (3 length, columns) table, rows (channel, x) with x in [0, length), to rows
    (channel, j). Returns N (rows, weights, offsets) for `bags`: rows and weights (3 size k,), the
    (3 size, k) taps flat, `resample_taps` of the crop (mirrored along j where ``flips[n]``;
    weights / 255 where ``vertical``) with the table row c length + x, cut to the crop's own k
    taps (the rest weigh 0); offsets `bag_offsets` (3 size, k).

    They depend on (length, size, flip, vertical) only: a kept ``scratch`` keeps them (up to
    ``TAPS_CACHE_BYTES``, least recently used dropped first), so a length seen before costs a
    look-up; the missing ones are computed together."""
    channels = 3
    keys = [(length, size, bool(flip), vertical) for length, flip in zip(lengths, flips)]
    store = scratch.taps if scratch.keep else {}
    missing = list(dict.fromkeys(key for key in keys if key not in store))
    if missing:
        length = torch.tensor([key[0] for key in missing])
        index, weight = resample_taps(torch.zeros_like(length), length, size)
        flipped = torch.tensor([key[2] for key in missing])[:, None, None]
        index = torch.where(flipped, index.flip(1), index)
        weight = torch.where(flipped, weight.flip(1), weight)
        taps = ((weight != 0).any(1).int().cumsum(1).argmax(1) + 1).tolist()
        weight = weight / 255 if vertical else weight
        for m, key in enumerate(missing):
            rows = (index[m, :, :taps[m]] + key[0] * torch.arange(channels)[:, None, None]).view(-1)
            store[key] = (rows, weight[m, :, :taps[m]].repeat(channels, 1).view(-1),
                          bag_offsets(channels * size, taps[m]))
            scratch.taps_bytes += 12 * rows.numel() if scratch.keep else 0
    found = []
    for key in keys:
        entry = store[key]
        if scratch.keep:  # most recently used last
            del store[key]
            store[key] = entry
        found.append(entry)
    while scratch.taps_bytes > TAPS_CACHE_BYTES and len(store) > len(keys):
        scratch.taps_bytes -= 12 * store.pop(next(iter(store)))[0].numel()
    return found


def resize_crops(source: torch.Tensor, owner: torch.Tensor, box: torch.Tensor, flip: torch.Tensor,
                 size: int, per_crop: bool | None = None, scratch: Scratch = FRESH,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``box[n]`` (top, left, height, width) of image ``owner[n]``, resize it
    to ``size`` x ``size`` (PIL's antialiased bicubic) and mirror it where
    ``flip[n]``. ``source``: `source_planes` of the images (any device; uint8
    or float for ``per_crop``, float otherwise); ``owner``, ``box``, ``flip``:
    CPU tensors (N,), (N, 4), (N,). Returns float (N, 3, size, size) in
    [0, 1]: ``out`` where given (contiguous).

    ``per_crop`` (default: on the CPU) runs both passes one crop at a time,
    each on tables holding only what the crop's taps read, with the crop's own
    number of taps (dropped taps weigh 0: adding 0 w changes no sum), so that
    nothing outside the crop is computed and every intermediate stays in
    cache: the horizontal pass reads the crop's region (columns
    [left, left + width) of rows [top, top + height), converted to float),
    the vertical pass the crop's (3 height, size) transposed intermediate,
    each pass's result clamped into a `Scratch` buffer or ``out``; the taps
    come from `crop_taps` (kept in ``scratch`` per crop length). Otherwise all
    crops and all H rows of their images go through each pass in one call."""
    channels = 3
    _, width, height = source.shape
    per_crop = source.device.type == "cpu" if per_crop is None else per_crop
    if per_crop:
        out = torch.empty(len(owner), channels, size, size) if out is None else out
        tops, lefts, heights, widths = box.unbind(1)
        heights, widths, flips = heights.tolist(), widths.tolist(), flip.tolist()
        # horizontal: crop n's table rows (channel, x - left), columns y - top -> rows (channel, j)
        x_taps = crop_taps(widths, size, flips, False, scratch)
        # vertical: crop n's table rows (channel, y - top), columns j -> rows (channel, i); 1/255 in the weights
        y_taps = crop_taps(heights, size, [False] * len(heights), True, scratch)
        region = scratch("region", (channels * max(h * w for h, w in zip(heights, widths)),), source.device)
        down_table = scratch("down_table", (channels * max(heights) * size,), source.device)
        rows_out = out.view(-1, size)  # crop n: rows [3 size n, 3 size (n + 1))
        plane = width * height
        region_at, down_at, source_at = region.storage_offset(), down_table.storage_offset(), source.storage_offset()
        # every view below is one as_strided (a crop's few small ops cost as much as its passes)
        for n, (image, top, left, count, span) in enumerate(zip(
                owner.tolist(), tops.tolist(), lefts.tolist(), heights, widths)):
            crop_table = region.as_strided((channels * span, count), (count, 1), region_at)
            crop_table.as_strided((channels, span, count), (span * count, count, 1), region_at).copy_(
                source.as_strided((channels, span, count), (plane, height, 1),
                                  source_at + image * channels * plane + left * height + top))
            across = bags(crop_table, *x_taps[n])
            crop_down = down_table.as_strided((channels * count, size), (size, 1), down_at)
            torch.clamp(across.as_strided((channels, count, size), (size * count, 1, count), across.storage_offset()),
                        0, 255, out=crop_down.as_strided((channels, count, size), (count * size, size, 1), down_at))
            torch.clamp(bags(crop_down, *y_taps[n]), 0, 1, out=rows_out[channels * size * n:channels * size * (n + 1)])
        return out
    x_index, x_weight = resample_taps(box[:, 1], box[:, 3], size)
    x_index = torch.where(flip[:, None, None], x_index.flip(1), x_index)
    x_weight = torch.where(flip[:, None, None], x_weight.flip(1), x_weight)
    y_index, y_weight = resample_taps(box[:, 0], box[:, 2], size)
    # horizontal pass: rows (image, channel, x) -> rows (crop, channel, j), columns y, transposed (and
    # clamped) into the vertical pass's table: rows (crop, channel, y)
    table = source.view(-1, height)
    planes = (owner[:, None] * channels + torch.arange(channels)).flatten()  # source plane of each output plane
    rows = (x_index.repeat_interleave(channels, 0) + (planes * width)[:, None, None]).flatten(0, 1)
    weights = x_weight.repeat_interleave(channels, 0).flatten(0, 1)
    across = weighted_rows(table, rows, weights).view(-1, size, height)
    down_table = torch.empty(channels * len(owner) * height, size, device=table.device)
    down_table.view(-1, height, size).copy_(across.transpose(1, 2))
    down_table.clamp_(0, 255)
    # vertical pass: rows (crop, channel, y) -> rows (crop, channel, i), columns j; 1/255 in the weights
    plane_start = (torch.arange(len(owner) * channels) * height).view(-1, channels)  # (N, 3): each plane's first row
    rows = y_index.repeat_interleave(channels, 0) + plane_start.flatten()[:, None, None]
    down = weighted_rows(down_table, rows.flatten(0, 1), y_weight.repeat_interleave(channels, 0).flatten(0, 1) / 255)
    down = down.clamp_(0, 1).view(len(owner), channels, size, size)
    return down if out is None else out.copy_(down)


# ---------------------------------------------------------------- colour
def on_rows(x: torch.Tensor, chosen: torch.Tensor, op, *per_row: torch.Tensor,
            scratch: Scratch = FRESH) -> torch.Tensor:
    """x[n] <- op(x[n], per_row[.][n]..., scratch) for the rows where the CPU mask ``chosen`` (N,) holds,
    in place; where it holds for every row, op's result on x itself (ops work in place where they can).
    The chosen rows are gathered into the scratch buffer "rows" and copied back: on the CPU one copy per
    run of consecutive rows (index_copy_ is several times slower there than plain copies)."""
    if len(x) and bool(chosen.all()):  # every row: no gather and scatter
        return op(x, *per_row, scratch=scratch)
    rows = chosen.nonzero()[:, 0]
    if len(rows):
        index = rows.to(x.device)
        picked = torch.index_select(x, 0, index, out=scratch("rows", (len(rows), *x.shape[1:]), x.device))
        done = op(picked, *(value[rows] for value in per_row), scratch=scratch)
        if x.device.type != "cpu":
            return x.index_copy_(0, index, done)
        # runs of consecutive rows: starts where a row does not follow the previous one
        starts = torch.cat([torch.ones(1, dtype=torch.bool), rows[1:] != rows[:-1] + 1]).nonzero()[:, 0].tolist()
        for first, end in zip(starts, starts[1:] + [len(rows)]):
            row = int(rows[first])
            x[row:row + end - first].copy_(done[first:end])
    return x


def per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) CPU values -> (N, 1, 1, 1) on ``like``'s device and dtype."""
    return value.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def luma(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) ITU-R 601-2 luma (into ``out`` where given)."""
    r, g, b = LUMA_WEIGHTS
    return torch.mul(x[:, 0:1], r, out=out).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def to_gray(x: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
    """(N, 3, H, W) -> its luma in all three channels (PIL's grayscale, then RGB), in place."""
    return x.copy_(luma(x, scratch("luma", (len(x), 1, *x.shape[2:]), x.device)).expand_as(x))


def invert(x: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
    """x -> 1 - x (PIL's ImageOps.invert on [0, 1]), in place."""
    return x.neg_().add_(1)


def solarize(x: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
    """Values >= 128/255 inverted (x -> 1 - x), as PIL's solarize at threshold 128, in place."""
    return torch.where(x >= 128 / 255, 1 - x, x, out=x)


def rotate_hue(x: torch.Tensor, shift: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
    """Add ``shift`` (N,) turns to the HSV hue of RGB ``x`` (N, 3, H, W) in [0, 1], in place.

    With M = max, m = min over channels, C = M - m and the shifted hue in
    sixths of a turn h = (g - b)/C + 6 shift if r = M, else (b - r)/C + 2 + 6 shift
    if g = M, else (r - g)/C + 4 + 6 shift, channel c of the result is
    m + C clamp(|u_c| - 1, 0, 1) with u_c = ((h + 6, 4, 2 for r, g, b) mod 6) - 3, the
    hue distance from the channel's hue 2c minus 3 (HSV -> RGB: the channel is M
    within one sixth of its own hue, m beyond two sixths, linear in between);
    u_c = (v - 3) - 6 [v >= 6], v = h + (6, 4, 2), where every |shift| <= 1/6.

    The branch is taken with 1/0 masks R (r = M), G (g = M, r < M), B = 1 - R - G, not
    selections: hC - (0, 2 or 4)C = R (g - b) + G (b - r) + B (r - g) and h = that / C +
    R 6 shift + G (6 shift + 2) + B (6 shift + 4) are the same floats (each sum adds
    exact zeros to the one term it keeps), several times cheaper on the CPU than where().
    Scratch: eight (N, 1, H, W) planes and one like x; x is overwritten once h is known.
    """
    plane = (len(x), 1, *x.shape[2:])
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    top = torch.amax(x, 1, keepdim=True, out=scratch("hue_top", plane, x.device))
    bottom = torch.amin(x, 1, keepdim=True, out=scratch("hue_bottom", plane, x.device))
    chroma = torch.sub(top, bottom, out=scratch("hue_chroma", plane, x.device))
    # the masks R, G, B as 1/0 floats
    red = torch.eq(r, top, out=scratch("hue_red", plane, x.device))
    green = torch.eq(g, top, out=scratch("hue_green", plane, x.device))
    green = torch.gt(green, red, out=green)
    blue = torch.add(red, green, out=scratch("hue_blue", plane, x.device))
    blue = torch.eq(blue, 0, out=blue)
    sixths = scratch("hue_sixths", plane, x.device)
    other = scratch("hue_other", plane, x.device)
    # h C - (0, 2 or 4) C = R (g - b) + G (b - r) + B (r - g)
    torch.sub(g, b, out=sixths).mul_(red)
    sixths.addcmul_(torch.sub(b, r, out=other), green).addcmul_(torch.sub(r, g, out=other), blue)
    sixths.div_(torch.clamp(chroma, min=1e-12, out=other))
    turn = per_sample(shift * 6, x)
    sixths.addcmul_(red, turn).addcmul_(green, turn + 2).addcmul_(blue, turn + 4)
    v = torch.add(sixths, torch.tensor([6.0, 4.0, 2.0], device=x.device).view(1, 3, 1, 1), out=x)
    if bool((shift.abs() <= 1 / 6).all()):
        # then h in [-2, 6], v in [0, 12], where u_c = (v mod 6) - 3 = (v - 3) - 6 [v - 3 >= 3], the same floats
        # (v - 3 is exact for v >= 3/2, so (v - 3) - 6 = (v - 6) - 3 = v - 9 exactly where v >= 6), without
        # remainder's slow elementwise kernel
        v = v.sub_(3)
        u = v.add_(torch.ge(v, 3, out=scratch("hue_far", v.shape, x.device)), alpha=-6).abs_()
    else:
        u = v.remainder_(6).sub_(3).abs_()
    u = u.sub_(1).clamp_(0, 1)
    return torch.addcmul(bottom, u, chroma, out=u)


def pil_hue_shift(turns: torch.Tensor) -> torch.Tensor:
    """The hue rotation PIL applies for a drawn shift: trunc(255 d) steps of 1/255 turn."""
    return torch.trunc(turns * HUE_STEPS) / HUE_STEPS


def color_jitter(x: torch.Tensor, applied: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 hue_space: str = "hsv", scratch: Scratch = FRESH) -> torch.Tensor:
    """Per-sample colour jitter in per-sample order, in place. ``applied`` (N,)
    bool, ``factors`` (N, 4) (brightness, contrast, saturation blend factors,
    hue shift in turns), ``order`` (N, 4) op index at each position: CPU tensors.
    A blend is x <- clamp(t + f (x - t), 0, 1), t = s L + c mean(L) with L the
    luma, (s, c) = (0, 0) brightness, (0, 1) contrast, (1, 0) saturation.
    Hue: PIL's HSV shift, or `pretrain.augment.rotate_hue_yiq` (``hue_space="yiq"``)."""
    shift = pil_hue_shift(factors[:, 3]) if hue_space == "hsv" else factors[:, 3]
    hue_op = rotate_hue if hue_space == "hsv" else (lambda rows, turns, scratch: rotate_hue_yiq(rows, turns))
    # every position's op, factor (1 where no blend) and target weights at once: (P, N, 1, 1, 1) on x's device
    op = torch.where(applied[:, None], order, -1)
    factor = torch.where((op >= 0) & (op <= 2), factors.gather(1, op.clamp(0, 2)), 1.0)
    factor, saturation, contrast = (value.t().to(device=x.device, dtype=x.dtype).reshape(*value.t().shape, 1, 1, 1)
                                    for value in (factor, op == 2, op == 1))
    rotated = (op == 3) & (shift != 0)[:, None]
    for position in range(order.shape[1]):
        target = luma(x, scratch("luma", (len(x), 1, *x.shape[2:]), x.device))
        mean = target.mean((2, 3), keepdim=True)
        target.mul_(saturation[position]).add_(mean.mul_(contrast[position]))
        torch.lerp(target.expand_as(x), x, factor[position], out=x).clamp_(0, 1)
        x = on_rows(x, rotated[:, position], hue_op, shift, scratch=scratch)
    return x


# ---------------------------------------------------------------- blur
def box_blur_kernels(radius: torch.Tensor) -> torch.Tensor:
    """PIL's extended box filter for Gaussian radius ``radius`` (N,): (N, 2L + 3)
    weights centred on the middle tap, L the largest integer half-width."""
    variance = radius.double() ** 2 / BLUR_PASSES
    half = torch.floor((torch.sqrt(12 * variance + 1) - 1) / 2)
    edge = (2 * half + 1) * (half * (half + 1) - 3 * variance) / (6 * (variance - (half + 1) ** 2))
    widest = int(half.max())
    offset = torch.arange(-widest - 1, widest + 2, dtype=torch.float64).abs()
    weight = torch.where(offset <= half[:, None], 1.0, torch.where(offset == half[:, None] + 1, edge[:, None], 0.0))
    return (weight / (2 * half + 1 + 2 * edge)[:, None]).float()


def box_half_widths(radius: torch.Tensor) -> torch.Tensor:
    """L of `box_blur_kernels` for each radius (N,): floor((sqrt(4 r^2 + 1) - 1) / 2), as it computes it."""
    variance = radius.double() ** 2 / BLUR_PASSES
    return torch.floor((torch.sqrt(12 * variance + 1) - 1) / 2)


def gaussian_blur(x: torch.Tensor, radius: torch.Tensor, scratch: Scratch = FRESH) -> torch.Tensor:
    """PIL's GaussianBlur(radius[n]) of each x[n] (N, 3, H, W): ``BLUR_PASSES``
    extended-box passes along W, then along H, edge pixels repeated each pass.

    Each pass reads a buffer padded by ``pad`` on both sides of the axis and
    writes straight into the middle of the other one, whose margins are then
    filled with its edge pixels (no padded copy per pass); the last pass along W
    writes into the middle of the first buffer along H, the last along H into x."""
    kernels = box_blur_kernels(radius).to(x.device)
    taps = kernels.shape[1]
    weights = kernels.view(len(x), 1, 1, 1, taps).unbind(-1)
    pad = taps // 2
    padded_buffers = {}
    for dim in (3, 2):
        shape = list(x.shape)
        shape[dim] += 2 * pad
        padded_buffers[dim] = [scratch(f"blur{dim}_{k}", shape, x.device) for k in range(2)]
    padded_buffers[3][0].narrow(3, pad, x.shape[3]).copy_(x)
    for dim, last in ((3, padded_buffers[2][0].narrow(2, pad, x.shape[2])), (2, x)):
        length = x.shape[dim]
        buffers = padded_buffers[dim]
        for step in range(BLUR_PASSES):
            padded = buffers[step % 2]
            padded.narrow(dim, 0, pad).copy_(padded.narrow(dim, pad, 1).expand_as(padded.narrow(dim, 0, pad)))
            padded.narrow(dim, pad + length, pad).copy_(padded.narrow(dim, pad + length - 1, 1)
                                                        .expand_as(padded.narrow(dim, 0, pad)))
            out = buffers[1 - step % 2].narrow(dim, pad, length) if step < BLUR_PASSES - 1 else last
            out = torch.mul(padded.narrow(dim, 0, length), weights[0], out=out)
            for tap in range(1, taps):
                out.addcmul_(padded.narrow(dim, tap, length), weights[tap])
    return x


# ---------------------------------------------------------------- the pipeline
class BatchMultiCrop:
    """Apply packed `CropParams` to a uint8 image batch: -> list of C (B, 3, S, S) crops.

    On the CPU each crop slot is resized one crop at a time straight into its
    output tensor (`resize_crops`), whose crops then go through the other steps
    in place, in chunks of ``chunk_bytes`` (default ``CPU_CHUNK_BYTES``) at
    12 S^2 bytes a crop: small enough to stay in cache, large enough that the
    per-op overhead is shared. Every buffer is reused (`Scratch`), and so are
    the uint8 source planes (B 3 H W bytes) for the next batch: the only
    allocation of a call is its C outputs. On a GPU, chunks of 1 GiB at
    12 S H bytes a crop (the vertical pass's table) go through every step.
    """

    def __init__(self, sizes: list[int], mean=IMAGENET_MEAN, std=IMAGENET_STD, chunk_bytes: int | None = None,
                 hue_space: str = "hsv"):
        self.sizes = list(sizes)
        self.hue_space = hue_space
        self.mean, self.std = list(mean), list(std)
        # (x - mean) / std as x * scale + shift
        self.scale = 1 / torch.tensor(std).view(1, 3, 1, 1)
        self.shift = -torch.tensor(mean).view(1, 3, 1, 1) * self.scale
        self.chunk_bytes = chunk_bytes
        self.planes: torch.Tensor | None = None  # the last CPU batch's `source_planes`, reused
        self.scratch = Scratch(keep=True)  # the CPU's work buffers, reused (a GPU's caching allocator does that)

    @classmethod
    def like(cls, augmentation: MultiCropAugmentation, chunk_bytes: int | None = None) -> "BatchMultiCrop":
        """The batched twin of a PIL augmentation (same sizes and normalisation)."""
        return cls(augmentation.sizes, augmentation.mean, augmentation.std, chunk_bytes, augmentation.hue_space)

    def augment(self, x: torch.Tensor, p: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """The steps after the resize for a chunk of resized crops ``x`` (N, 3, S, S) of one size:
        ``out`` (N, 3, S, S) <- normalised crops (``out`` may be ``x`` itself)."""
        scratch = self.scratch if x.device.type == "cpu" else FRESH
        x = color_jitter(x, p["jitter"], p["factors"], p["order"], self.hue_space, scratch=scratch)
        x = on_rows(x, p["grayscale"], to_gray, scratch=scratch)
        x = on_rows(x, p["invert"], invert, scratch=scratch)
        # blurred crops grouped by box half-width L (2L + 3 taps each; most radii < sqrt 2 have L = 0): a
        # group's kernels are as wide as its own L needs, not the chunk's widest (the extra taps weigh 0)
        half = box_half_widths(p["blur_radius"])
        for width in half[p["blur"]].unique().tolist():
            x = on_rows(x, p["blur"] & (half == width), gaussian_blur, p["blur_radius"], scratch=scratch)
        x = on_rows(x, p["solarize"], solarize, scratch=scratch)
        shift = self.shift.to(x.device)
        if x.device.type == "cpu":  # addcmul runs a scalar loop there when its first operand is broadcast
            shift = scratch.expanded(f"shift{x.shape[-1]}", shift, x.shape)
        torch.addcmul(shift, x, self.scale.to(x.device), out=out)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """``images``: uint8 (B, 3, H, W) on any device; ``params``: `pack_params` of
        their crops (CPU). Returns the C crops, each float (B, 3, S, S) on that device."""
        batch, _, height, _ = images.shape
        on_cpu = images.device.type == "cpu"
        budget = self.chunk_bytes or (CPU_CHUNK_BYTES if on_cpu else 2**30)
        # the CPU's per-crop resize converts each crop's region to float itself: uint8 planes suffice
        source = source_planes(images, self.planes, torch.uint8 if on_cpu else torch.float32)
        if on_cpu:  # kept for the next batch: see the class doc
            self.planes = source
        crops = []
        for slot, size in enumerate(self.sizes):
            p = {name: value[slot] for name, value in params.items()}
            out = torch.empty(batch, 3, size, size, device=images.device)  # one per slot: see the class doc
            if on_cpu:  # resized one crop at a time straight into out, then the rest in place in chunks
                resize_crops(source, torch.arange(batch), p["box"], p["flip"], size, scratch=self.scratch, out=out)
            step = max(1, budget // (12 * size * (size if on_cpu else height)))
            for start in range(0, batch, step):
                part = slice(start, start + step)
                chunk = {name: value[part] for name, value in p.items()}
                x = out[part] if on_cpu else resize_crops(source, torch.arange(batch)[part], chunk["box"],
                                                          chunk["flip"], size)
                self.augment(x, chunk, out[part])
            crops.append(out)
        return crops

    def crop_images(self, images: list[torch.Tensor], params: dict[str, torch.Tensor],
                    group_pixels: int | None = None) -> list[torch.Tensor]:
        """``images``: B uint8 (3, h_i, w_i) of any sizes, on one device; ``params``: `pack_params`
        of their crops. Returns what ``self(pad_images(images), params)`` returns, without padding
        every image to the largest of the batch (one 4000 x 3000 photo would make a batch of 128
        padded planes 18 GB in float): images sorted by size are padded in groups of at most
        ``group_pixels`` pixels (`padded_groups`; default `GROUP_PIXELS` of the device) and each
        group is cropped alone. A crop depends only on its own image, so the result is the same."""
        device = images[0].device
        groups = padded_groups([tuple(image.shape[1:]) for image in images],
                               group_pixels or GROUP_PIXELS[device.type == "cpu"])
        if len(groups) == 1:
            return self(pad_images(images), params)
        crops = [torch.empty(len(images), 3, size, size, device=device) for size in self.sizes]
        for group in groups:
            members = torch.tensor(group)
            part = self(pad_images([images[i] for i in group]),
                        {name: value[:, members] for name, value in params.items()})
            slots = members.to(device)
            for out, crop in zip(crops, part):
                out[slots] = crop
        return crops

    def on_device(self, batch: DecodedBatch, device: torch.device) -> list[torch.Tensor]:
        """Move a collated batch's images to ``device`` (one copy) and augment them there (`crop_images`)."""
        return self.crop_images(batch.images(device), batch.params)


# pixels (per channel) of one padded group of images (`padded_groups`): on a GPU 2^26 (a float batch of
# 0.8 GB; a batch of 128 ImageNet images usually fits in one); on the CPU 2^24 (uint8 planes of 48 MB)
GROUP_PIXELS = {False: 2**26, True: 2**24}


def padded_groups(sizes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Indices of images of ``sizes`` (height, width) in groups, each padded to its own largest
    height and width: images in order of (height, width), a group closed before it would exceed
    ``budget`` pixels (members x max height x max width); an image over the budget alone is a group.
    One group, in the original order, when the whole batch fits."""
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if len(sizes) * height * width <= budget:
        return [list(range(len(sizes)))]
    groups, group, height, width = [], [], 0, 0
    for index in sorted(range(len(sizes)), key=lambda i: sizes[i]):
        grown_h, grown_w = max(height, sizes[index][0]), max(width, sizes[index][1])
        if group and (len(group) + 1) * grown_h * grown_w > budget:
            groups.append(group)
            group, grown_h, grown_w = [], sizes[index][0], sizes[index][1]
        group.append(index)
        height, width = grown_h, grown_w
    return groups + [group]


def move_crops(crops: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The loader path's crops (already augmented) moved to ``device``."""
    return [crop.to(device, non_blocking=True) for crop in crops]


def resolve_pipeline(augment_on: str, decode_on: str, device: torch.device) -> tuple[str, str]:
    """``--augment-on`` and ``--decode-on`` with "auto" made concrete for ``device``: on CUDA both
    "device" (the workers only read bytes), on the CPU both "loader" (the workers' PIL pipeline
    runs beside the train step on the other cores). One-line `UserError` for unknown or
    contradictory values."""
    if augment_on not in ("auto", "loader", "device"):
        raise UserError(f"unknown --augment-on '{augment_on}': use auto, loader (PIL in the data-loader workers) "
                        "or device (batched on the training device)")
    if decode_on not in ("auto", "loader", "device"):
        raise UserError(f"unknown --decode-on '{decode_on}': use auto, loader (the data-loader workers decode) "
                        "or device (the workers read bytes; JPEGs are decoded on the training device)")
    on_gpu = device.type == "cuda"
    if augment_on == "auto":
        augment_on = "device" if on_gpu or decode_on == "device" else "loader"
    if decode_on == "auto":
        decode_on = "device" if on_gpu and augment_on == "device" else "loader"
    if decode_on == "device" and augment_on == "loader":
        raise UserError("--decode-on device needs --augment-on device (the loader workers' PIL augmentation "
                        "needs decoded images): pass --augment-on device or --decode-on loader")
    return augment_on, decode_on


def crop_pipeline(augment_on: str, base: torch.utils.data.Dataset, augmentation: MultiCropAugmentation,
                  seed: int, decode_on: str = "loader") -> tuple[torch.utils.data.Dataset, Callable | None, Callable]:
    """(dataset keyed by (epoch, index), its collate_fn, batch -> crops on a device) for
    ``augment_on`` "loader" (PIL per image in the loader workers) or "device" (batched on the
    training device), and ``decode_on`` "loader" (the workers decode) or "device" (the workers
    read bytes: `pretrain.device_decode`). Values as `resolve_pipeline` returns them."""
    if augment_on == "loader" and decode_on == "loader":
        return MultiCropDataset(base, augmentation, seed), None, move_crops
    batched = BatchMultiCrop.like(augmentation)
    if augment_on == "device" and decode_on == "loader":
        return DecodedCropDataset(base, augmentation, seed), collate_decoded, batched.on_device
    if augment_on == "device" and decode_on == "device":
        dataset = EncodedCropDataset(base, augmentation, seed)
        return dataset, collate_encoded, DecodeThenCrop(dataset, batched)
    raise UserError(f"--augment-on {augment_on} with --decode-on {decode_on} is not a pipeline: "
                    "see resolve_pipeline")
