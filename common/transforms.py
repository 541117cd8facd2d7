"""The ImageNet normalisation and the evaluation view every evaluator and the k-NN monitor share."""
from __future__ import annotations

import torchvision.transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int = 224) -> T.Compose:
    """The evaluation view (docs/protocols.md, "k-NN"): Resize(image_size * 256/224, bicubic)
    -> CenterCrop(image_size) -> tensor -> ImageNet normalisation."""
    return T.Compose([
        T.Resize(round(image_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
