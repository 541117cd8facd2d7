"""Data-pipeline throughput: decode + 2 global + N local crops, PIL per image vs batched.

    python -m bench.augment_throughput [--cases paper demo] [--images 64] [--batch 32] [--repeats 3]

Cases: ``paper``: 2x224 + 10x96 crops of 500x375 JPEGs (photo-like: a smooth
random colour field with fine noise, quality 90); ``demo``: the demo preset's
crops, jitter, grayscale and blur settings on 32-px PNGs of the generated
suite. Rows, all in images/s per CPU core (one intra-op thread, CPU time of
this process, so other jobs on the machine do not count):

* ``pil``: the loader path, decode + PIL multi-crop one image at a time;
* ``batched-cpu``: the device path with the CPU as device, decode + draw per
  image, collate, `BatchMultiCrop` per batch;
* ``decode+draw``: what the device path leaves to the loader workers when a
  GPU augments (decode, draw the crop parameters, collate);
* ``read+draw``: what they keep when the GPU decodes too (``--decode-on
  device``: read the file's bytes and its header, draw, collate);
* ``batched-cuda`` (when a GPU is present): the device path with the
  augmentation on the GPU, the images decoded on the CPU, in images/s of
  wall-clock time; ``nvjpeg+batched-cuda``: decoded on the GPU too (nvJPEG).

Each figure is the best of ``--repeats`` passes over the images, each pass an
epoch of its own (new crops, as in training).
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from data.imagefolder import ImageFolder, load_rgb
from data.suite_classification import render_object_image
from pretrain.augment import DecodedCropDataset, MultiCropAugmentation, collate_decoded, sample_rng
from pretrain.batch_augment import BatchMultiCrop
from pretrain.config import resolve
from pretrain.device_decode import DecodeThenCrop, EncodedCropDataset, collate_encoded

CASES = {
    "paper": dict(preset="paper", image="jpeg"),  # 2x224 + 10x96 of 500x375 JPEGs
    "demo": dict(preset="demo", image="suite"),  # 2x32 + 4x16 of 32-px suite PNGs
}


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A smooth random colour field (bicubic upsampling of 12x9 colours) plus noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.float64) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def write_images(root: str, kind: str, count: int) -> str:
    os.makedirs(f"{root}/c", exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        if kind == "jpeg":
            photo_like(rng).save(f"{root}/c/{i:04d}.jpg", quality=90)
        else:
            render_object_image(rng, i % 10, 32)[0].save(f"{root}/c/{i:04d}.png")
    return root


def best_seconds(run, repeats: int, clock=time.process_time) -> float:
    run()  # warm-up (allocator, lazy init)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def measure(case: str, count: int, batch: int, repeats: int) -> list[dict]:
    spec = CASES[case]
    cfg = resolve(spec["preset"])
    augmentation = MultiCropAugmentation.from_config(cfg)
    batched = BatchMultiCrop.like(augmentation)
    crops = f"2x{cfg.global_crops_size}+{cfg.local_crops_number}x{cfg.local_crops_size}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = ImageFolder(write_images(tmp, spec["image"], count))
        decoded = DecodedCropDataset(folder, augmentation)
        encoded = EncodedCropDataset(folder, augmentation)
        decode_then_crop = DecodeThenCrop(encoded, batched)
        batches = [range(start, min(start + batch, count)) for start in range(0, count, batch)]
        passes = itertools.count()  # each pass is a new epoch: new crops, as in training (no warm caches)

        def pil_path():
            epoch = next(passes)
            for index, (path, _) in enumerate(folder.samples):
                augmentation(load_rgb(path), sample_rng(0, epoch, index))

        def decode_and_draw():
            epoch = next(passes)
            return [collate_decoded([decoded[(epoch, index)] for index in indices]) for indices in batches]

        def read_and_draw():
            epoch = next(passes)
            return [collate_encoded([encoded[(epoch, index)] for index in indices]) for indices in batches]

        def device_decode_path(device: torch.device):
            for collated in read_and_draw():
                decode_then_crop(collated, device)
            torch.cuda.synchronize()

        def batched_path(device: torch.device):
            for collated in decode_and_draw():
                batched.on_device(collated, device)
            if device.type == "cuda":
                torch.cuda.synchronize()

        paths = {"pil": pil_path, "batched-cpu": lambda: batched_path(torch.device("cpu")),
                 "decode+draw": decode_and_draw, "read+draw": read_and_draw}
        rows = [dict(case=case, crops=crops, path=name, images_per_s=count / best_seconds(run, repeats))
                for name, run in paths.items()]
        if torch.cuda.is_available():
            seconds = best_seconds(lambda: batched_path(torch.device("cuda")), repeats, time.perf_counter)
            rows.append(dict(case=case, crops=crops, path="batched-cuda", images_per_s=count / seconds))
            seconds = best_seconds(lambda: device_decode_path(torch.device("cuda")), repeats, time.perf_counter)
            rows.append(dict(case=case, crops=crops, path="nvjpeg+batched-cuda", images_per_s=count / seconds))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=sorted(CASES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"images/s per CPU core (one thread, CPU time); GPU: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"{'case':<7}{'crops':<14}{'path':<21}{'images/s':>10}{'vs pil':>8}")
    for case in args.cases:
        rows = measure(case, args.images, args.batch, args.repeats)
        for row in rows:
            print(f"{row['case']:<7}{row['crops']:<14}{row['path']:<21}{row['images_per_s']:>10.1f}"
                  f"{row['images_per_s'] / rows[0]['images_per_s']:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
