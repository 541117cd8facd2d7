"""Linear probe on a frozen backbone (docs/protocols.md, "Linear probe").

    python -m evaluate.linear --ckpt runs/demo/checkpoint.pth --data data/suite/classification
    python -m evaluate.linear --ckpt dino_vitbase16.pth --data /data/imagenet --batch-size 1024
    python -m evaluate.linear --ckpt random --arch vit_small --data data/suite/classification \
        --cached-features --epochs 20

Features (docs/protocols.md, "Linear probe"; paper Appendix F): ViT-S (and every ViT but ViT-B): the [CLS] of
the last n = 4 blocks, each through the final LayerNorm, concatenated (4D);
ViT-B: n = 1 and the [CLS] interleaved with the mean patch token (2D);
ResNet-50: the pooled output. ``--n-last-blocks`` / ``--avgpool-patchtokens``
override the rule. A ViT shallower than 4 blocks uses all of them.

Classifier: one Linear(F, C), weight ~ N(0, 0.01), bias 0, no BatchNorm.
Training: cross-entropy, SGD (momentum 0.9, no weight decay) with
lr = base_lr * batch / 256 (base_lr 1e-3, batch 1024 -> 4e-3) annealed per
epoch as lr_e = lr * (1 + cos(pi e / E)) / 2 (CosineAnnealingLR, E epochs),
100 epochs. Train view: RandomResizedCrop(S, scale (0.08, 1), bilinear) +
horizontal flip; val view: Resize(S * 256/224, bicubic) + CenterCrop(S),
S = 224 (or the checkpoint's global crop size). Reported: the best val
top-1 over the epochs (as the official code) and the top-5 of that epoch.

Two paths. Faithful (default): every epoch re-extracts the features of
freshly augmented crops. ``--cached-features`` (alias ``--no-augment``), a
departure from the paper: the train features are those of the val view,
extracted once (and cached), and the epochs only shuffle them; without
augmentation the probe fits a little less well but runs in seconds on a CPU.
Val features are the same in both paths (the backbone is frozen and the val
view deterministic) and come from the feature cache.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli
from common.knn import accuracies
from common.progress import progress_bar
from common.scaling import scaled_lr
from common.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from data.imagefolder import ImageFolder, split_root
from pretrain.backbones import describe, is_vit
from pretrain.checkpoint import atomic_save

from .features import FeatureExtractor, FeatureSpec
from .model_source import add_evaluator_arguments, feature_extractor, load_model

BASE_LR = 1e-3
BATCH_SIZE = 1024
EPOCHS = 100
MOMENTUM = 0.9


def linear_feature_spec(model: nn.Module, n_last_blocks: int | None = None,
                        avgpool_patchtokens: bool | None = None) -> FeatureSpec:
    """The official per-arch feature: ViT-B n=1 + avgpool; other ViTs n=min(4, depth); convnets 'cls'."""
    if not is_vit(model):
        return FeatureSpec("cls")
    is_base = describe(model)["arch"] == "vit_base"
    n = n_last_blocks if n_last_blocks is not None else (1 if is_base else min(4, len(model.blocks)))
    if not 1 <= n <= len(model.blocks):
        raise UserError(f"--n-last-blocks {n} is outside 1..{len(model.blocks)} (the backbone's depth)")
    avgpool = is_base if avgpool_patchtokens is None else avgpool_patchtokens
    return FeatureSpec("last_blocks", n_last_blocks=n, avgpool_patchtokens=avgpool)


def train_transform(image_size: int = 224) -> T.Compose:
    """The official training view: RandomResizedCrop (bilinear) + flip + normalise."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class LinearClassifier(nn.Module):
    """features (B, F) -> logits (B, C) = x W^T + b; W ~ N(0, 0.01^2), b = 0 (official init)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


@dataclass
class LinearProbeResult:
    """Best val top-1 over epochs and the top-5 of that epoch (percent); per-epoch history."""
    top1: float
    top5: float
    best_epoch: int
    classifier: LinearClassifier
    history: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Named as table2_linear_knn's metrics."""
        return {"linear_top1": self.top1, "linear_top5": self.top5}


@torch.no_grad()
def classifier_accuracies(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                          chunk: int = 4096) -> tuple[float, float]:
    """Top-1 and top-5 (percent) of ``classifier`` on (N, F) features."""
    device = next(classifier.parameters()).device
    logits = torch.cat([classifier(features[start:start + chunk].to(device)).cpu()
                        for start in range(0, len(features), chunk)])
    return accuracies(logits, labels.cpu(), 5)


def shuffled_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    """epoch -> batches of (features, labels) in a new random order each epoch (last batch may be short)."""
    def batches(epoch: int):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            yield features[chosen], labels[chosen]
    return batches


def augmented_batches(extractor: FeatureExtractor, dataset, spec: FeatureSpec, batch_size: int,
                      generator: torch.Generator):
    """epoch -> batches of (features of freshly augmented crops, labels), images in a random order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                                         num_workers=extractor.num_workers,
                                         pin_memory=extractor.device.type == "cuda")

    def batches(epoch: int):
        for images, labels in progress_bar(loader, desc=f"epoch {epoch} crops", leave=False,
                                           disable=not extractor.progress):
            yield extractor.batch(images, spec), labels.to(extractor.device)
    return batches


def train_linear_probe(train_batches, val_features: torch.Tensor, val_labels: torch.Tensor, num_classes: int,
                       epochs: int = EPOCHS, lr: float = scaled_lr(BASE_LR, BATCH_SIZE), val_every: int = 1,
                       device: torch.device | str = "cpu", seed: int = 0, progress: bool = False) -> LinearProbeResult:
    """Train a `LinearClassifier` with SGD + per-epoch cosine annealing; validate every ``val_every`` epochs.

    ``train_batches(epoch)`` yields (features (B, F), labels (B,)) on ``device``.
    History entries: epoch, lr (the epoch's lr), loss (mean over batches) and,
    on validated epochs, top1/top5.
    """
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    torch.manual_seed(seed)
    classifier = LinearClassifier(val_features.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.0)
    best = LinearProbeResult(top1=-1.0, top5=0.0, best_epoch=-1, classifier=classifier)
    for epoch in progress_bar(range(epochs), desc="linear probe", disable=not progress):
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        classifier.train()
        losses = []
        for features, labels in train_batches(epoch):
            loss = F.cross_entropy(classifier(features.float()), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        record["loss"] = sum(losses) / max(len(losses), 1)
        if (epoch + 1) % val_every == 0 or epoch + 1 == epochs:
            classifier.eval()
            record["top1"], record["top5"] = classifier_accuracies(classifier, val_features, val_labels)
            if record["top1"] > best.top1:
                best.top1, best.top5, best.best_epoch = record["top1"], record["top5"], epoch
        best.history.append(record)
    return best


def run_linear(extractor: FeatureExtractor, data_root, image_size: int = 224, spec: FeatureSpec | None = None,
               epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, base_lr: float = BASE_LR, augment: bool = True,
               val_every: int = 1, seed: int = 0) -> LinearProbeResult:
    """The linear probe of ``extractor.model`` on ``data_root``/train, scored on ``data_root``/val."""
    train_dir, val_dir = split_root(data_root)
    val_set = ImageFolder(val_dir, eval_transform(image_size))
    train_set = ImageFolder(train_dir, train_transform(image_size) if augment else eval_transform(image_size))
    if train_set.classes != val_set.classes:
        raise UserError(f"train and val of '{data_root}' have different class folders: they must match")
    spec = spec or linear_feature_spec(extractor.model)
    generator = torch.Generator().manual_seed(seed)
    val_features, val_labels = extractor(val_set, spec, "val")
    if augment:
        batches = augmented_batches(extractor, train_set, spec, batch_size, generator)
    else:
        train_features, train_labels = extractor(train_set, spec, "train")
        batches = shuffled_batches(train_features.to(extractor.device), train_labels.to(extractor.device),
                                   batch_size, generator)
    return train_linear_probe(batches, val_features, val_labels, len(val_set.classes), epochs,
                              scaled_lr(base_lr, batch_size), val_every, extractor.device, seed,
                              progress=extractor.progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluate.linear",
                                     description="linear probe of a frozen backbone "
                                                 "(docs/protocols.md, 'Linear probe')")
    parser.add_argument("--data", required=True, help="folder with train/<class>/... and val/<class>/...")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=BASE_LR, help="base lr, scaled by batch / 256")
    parser.add_argument("--image-size", type=int, default=None,
                        help="crop side (default 224, or the checkpoint's global crop size)")
    parser.add_argument("--n-last-blocks", type=int, default=None, help="default: 1 for vit_base, else 4")
    parser.add_argument("--avgpool-patchtokens", type=int, choices=(0, 1), default=None,
                        help="append the mean patch token (default: 1 for vit_base, else 0)")
    parser.add_argument("--cached-features", "--no-augment", dest="cached_features", action="store_true",
                        help="train on cached features of un-augmented images (fast; departs from the paper)")
    parser.add_argument("--val-every", type=int, default=1)
    parser.add_argument("--output", default=None, help="save the trained linear layer here (.pth)")
    add_evaluator_arguments(parser, batch_size=BATCH_SIZE)  # --batch-size: extraction and the probe's batch
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    source = load_model(args)
    extractor = feature_extractor(source, args)
    avgpool = None if args.avgpool_patchtokens is None else bool(args.avgpool_patchtokens)
    spec = linear_feature_spec(extractor.model, args.n_last_blocks, avgpool)
    image_size = args.image_size or source.crop_size or 224
    result = run_linear(extractor, args.data, image_size, spec, args.epochs, args.batch_size, args.lr,
                        augment=not args.cached_features, val_every=args.val_every, seed=args.seed)
    print(f"linear probe: top-1 {result.top1:.2f}  top-5 {result.top5:.2f}  "
          f"(best epoch {result.best_epoch + 1} of {args.epochs})")
    if args.output:
        atomic_save({"state_dict": result.classifier.state_dict(), "epoch": args.epochs,
                     "best_acc": result.top1, "feature": spec.describe()}, args.output)
    if args.json:
        atomic_write_text(args.json, json.dumps({**result.metrics(), "best_epoch": result.best_epoch,
                                                 "history": result.history}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
