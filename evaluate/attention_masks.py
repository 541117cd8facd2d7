"""Masks from the last block's [CLS] attention, scored on PASCAL VOC12 by Jaccard
(docs/protocols.md, "VOC attention-mask Jaccard").

    python -m evaluate.attention_masks --ckpt runs/demo/checkpoint.pth --voc /data/VOCdevkit
    python -m evaluate.attention_masks --ckpt random --arch vit_small --patch 16 --voc /data/VOCdevkit --masks object
    python -m evaluate.attention_masks --ckpt runs/demo/checkpoint.pth --voc data/suite/voc --image-size 96

Per image x (3, H, W), with p the patch size and (h, w) = (H / p, W / p):

    A[k]    = attn_last[k, 0, 1:]        head k's [CLS]-to-patch attention (softmax rows, CLS column dropped)
    mask[k] = the highest-attention patches of A[k] that carry ``mass`` (0.6) of its total
              (`evaluate.metrics.attention_mass_masks`), nearest-upsampled by p to pixels
    J(image) = mean over objects o of max over heads k of IoU(mask[k], gt == o)
               (objects: labels other than 0 and 255; void 255 pixels left out of the IoU)
    score    = 100 * mean over images with an object of J(image)

Choices the authors left open (docs/protocols.md, "VOC attention-mask Jaccard"), and ours: the image and its label map
are resized to exactly ``--image-size`` x ``--image-size`` (480, as
visualize_attention; bilinear for the image, nearest for the labels), or with
``--resize short-side`` the short side to ``--image-size`` with the aspect kept
(torchvision's rule), both then cropped to multiples of p from the top-left;
the Jaccard is computed at that resolution. Objects are the classes of
``SegmentationClass`` (default, as the third-party reproductions) or the
instances of ``SegmentationObject`` (``--masks object``). ``--mass 0.8`` gives
the appendix translation's variant. ImageNet mean/std, fp32.

`attention_maps` returns one image's per-head maps and masks (figures reuse it).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.functional as TF

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli
from common.progress import progress_bar
from common.transforms import IMAGENET_MEAN, IMAGENET_STD
from data.voc import VOCSegmentation
from evaluate.features import default_device
from evaluate.metrics import attention_mass_masks, best_head_jaccard, mean_jaccard, patch_masks_to_pixels
from evaluate.model_source import add_evaluator_arguments, feature_extractor, load_model

RESIZE_MODES = ("square", "short-side")
MASK_KINDS = ("class", "object")


def resized_size(width: int, height: int, image_size: int = 480, resize: str = "square") -> tuple[int, int]:
    """(width', height') before the crop: ``square`` -> (s, s); ``short-side`` -> short side s,
    long side int(s * long / short) (torchvision ``Resize(int)``)."""
    if resize == "square":
        return image_size, image_size
    if resize != "short-side":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


def prepare_pair(image: PIL.Image.Image, label_map: np.ndarray | None, patch_size: int, image_size: int = 480,
                 resize: str = "square") -> tuple[torch.Tensor, np.ndarray | None]:
    """(normalised (3, H, W) image, (H, W) label map or None), resized and cropped to multiples of p."""
    size = resized_size(*image.size, image_size, resize)
    width, height = (side - side % patch_size for side in size)
    if min(width, height) <= 0:
        raise UserError(f"--image-size {image_size} gives {size[0]}x{size[1]} images, smaller than a "
                        f"{patch_size}-px patch: raise --image-size")
    pixels = TF.to_tensor(image.resize(size, PIL.Image.BILINEAR))[:, :height, :width]
    pixels = TF.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
    if label_map is None:
        return pixels, None
    labels = np.array(PIL.Image.fromarray(label_map).resize(size, PIL.Image.NEAREST))[:height, :width]
    return pixels, labels


def cls_attentions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) fp32: the last block's attention of the [CLS] query over the patches."""
    attention = model.get_last_selfattention(images)  # (B, heads, 1 + N, 1 + N)
    height, width = (side // model.patch_size for side in images.shape[-2:])
    return attention[:, :, 0, 1:].float().reshape(*attention.shape[:2], height, width)


@dataclass
class AttentionMaps:
    """One image's per-head [CLS] attention and mass masks.

    attentions (heads, h, w) float32, patch_masks (heads, h, w) bool,
    image (3, H, W) normalised input, patch_size p (H = h * p, W = w * p).
    """
    attentions: np.ndarray
    patch_masks: np.ndarray
    image: torch.Tensor
    patch_size: int

    @property
    def pixel_masks(self) -> np.ndarray:
        """(heads, H, W) bool: the masks nearest-upsampled to pixels."""
        return upsample_to_pixels(self.patch_masks, self.patch_size)

    @property
    def pixel_attentions(self) -> np.ndarray:
        """(heads, H, W) float32: the attentions nearest-upsampled to pixels (as visualize_attention)."""
        return upsample_to_pixels(self.attentions, self.patch_size)


def head_masks(attentions: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """(heads, h, w) attentions -> (heads, h, w) bool mass masks (`attention_mass_masks` per head)."""
    return attention_mass_masks(attentions.reshape(len(attentions), -1), mass).reshape(attentions.shape)


def upsample_to_pixels(maps: np.ndarray, patch_size: int) -> np.ndarray:
    """(heads, h, w) -> (heads, h * p, w * p), each patch's value repeated over its p x p pixels."""
    return patch_masks_to_pixels(maps.reshape(len(maps), -1), maps.shape[1:], patch_size)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, image: PIL.Image.Image, image_size: int = 480, resize: str = "square",
                   mass: float = 0.6, device=None) -> AttentionMaps:
    """Per-head [CLS] attention maps and ``mass`` masks of one RGB image (resized as the evaluator does)."""
    device = device or next(model.parameters()).device
    pixels, _ = prepare_pair(image, None, model.patch_size, image_size, resize)
    attentions = cls_attentions(model.eval(), pixels[None].to(device))[0].cpu().numpy()
    return AttentionMaps(attentions, head_masks(attentions, mass), pixels, model.patch_size)


class VOCAttentionPairs(torch.utils.data.Dataset):
    """(image (3, H, W), label map (H, W) uint8) of each image of a VOC split, prepared by `prepare_pair`."""

    def __init__(self, voc: VOCSegmentation, mask_kind: str, patch_size: int, image_size: int, resize: str):
        self.voc, self.mask_kind = voc, mask_kind
        self.patch_size, self.image_size, self.resize = patch_size, image_size, resize

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int):
        image_id = self.voc.image_ids[index]
        load_mask = self.voc.load_class_mask if self.mask_kind == "class" else self.voc.load_object_mask
        pixels, labels = prepare_pair(self.voc.load_image(image_id), load_mask(image_id), self.patch_size,
                                      self.image_size, self.resize)
        return pixels, torch.from_numpy(labels)


def run_attention_masks(model: torch.nn.Module, voc_root, split: str = "val", mask_kind: str = "class",
                        image_size: int = 480, resize: str = "square", mass: float = 0.6, batch_size: int = 16,
                        num_workers: int = 2, device=None, progress: bool = True) -> dict:
    """{'voc12_jaccard': percent} of the ``mass`` attention masks on a VOC split (see the module docstring)."""
    if not hasattr(model, "get_last_selfattention") or not hasattr(model, "patch_size"):
        raise UserError(f"attention masks need a ViT backbone, not {type(model).__name__}")
    if mask_kind not in MASK_KINDS or resize not in RESIZE_MODES or not 0 < mass <= 1:
        raise UserError(f"--masks must be one of {MASK_KINDS}, --resize one of {RESIZE_MODES} and --mass in (0, 1] "
                        f"(got {mask_kind}, {resize}, {mass})")
    voc = VOCSegmentation(voc_root, split, mask_kinds=(mask_kind,))
    pairs = VOCAttentionPairs(voc, mask_kind, model.patch_size, image_size, resize)
    # images of one size batch together; with short-side resizing sizes differ, so one at a time
    loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size if resize == "square" else 1,
                                         num_workers=num_workers)
    device = device or default_device()
    model = model.float().eval().to(device)
    per_image = []
    with torch.no_grad(), progress_bar(total=len(pairs), desc="voc attention", unit="img", disable=not progress) as bar:
        for images, label_maps in loader:
            attentions = cls_attentions(model, images.to(device)).cpu().numpy()
            for image_attentions, label_map in zip(attentions, label_maps.numpy()):
                masks = upsample_to_pixels(head_masks(image_attentions, mass), model.patch_size)
                per_image.append(best_head_jaccard(masks, label_map))
            bar.update(len(images))
    if all(value is None for value in per_image):
        raise UserError(f"no image of '{voc.split_file}' has an object in its {mask_kind} mask: nothing to score")
    return {"voc12_jaccard": mean_jaccard(per_image)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.attention_masks",
                                     description="VOC12 Jaccard of [CLS]-attention masks (always fp32: "
                                                 "--fp32 and the cache flags do not apply)")
    parser.add_argument("--voc", required=True, help="the VOC2012 or VOCdevkit folder")
    parser.add_argument("--split", default="val", help="ImageSets/Segmentation/<split>.txt (default val)")
    parser.add_argument("--masks", choices=MASK_KINDS, default="class",
                        help="objects: SegmentationClass classes (default) or SegmentationObject instances")
    parser.add_argument("--mass", type=float, default=0.6, help="attention mass each head's mask keeps (default 0.6)")
    parser.add_argument("--image-size", type=int, default=480, help="resize side (default 480)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="square",
                        help="square: exactly image-size x image-size (default); short-side: aspect kept")
    add_evaluator_arguments(parser, batch_size=16)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extractor = feature_extractor(load_model(args), args)
    scores = run_attention_masks(extractor.model, args.voc, args.split, args.masks, args.image_size, args.resize,
                                 args.mass, args.batch_size, extractor.num_workers, extractor.device,
                                 progress=extractor.progress)
    print(f"VOC12 {args.split} Jaccard ({args.masks} masks, mass {args.mass:g}, {args.resize} "
          f"{args.image_size}): {scores['voc12_jaccard']:.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(scores, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
