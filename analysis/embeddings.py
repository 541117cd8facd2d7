"""t-SNE of frozen features coloured by class, and k-NN neighbour grids (a query, then its top-k train images).

    python -m analysis.embeddings --ckpt runs/demo/checkpoint.pth --data data/suite/classification

Features are the k-NN evaluator's (`evaluate.knn`, docs/protocols.md, "k-NN"): the backbone's final-normed [CLS]
embedding f (D,) of the Resize(s * 256 / 224, bicubic) + CenterCrop(s) view, L2-normalised,
f <- f / ||f||_2. The crop s is the k-NN crop of `evaluate.eval_plan` unless one is given: 224 on
real data; on the embedded suite the checkpoint's global crop (the CLI reads it from the checkpoint),
else the suite's image size.

tsne.png: the val features X (n, D), n <= ``max_points`` (a seeded class-stratified sample when the
split is larger), mapped to Y (n, 2) by scikit-learn's t-SNE: Euclidean distances between unit
vectors, ||a - b||^2 = 2 - 2 cos(a, b), so the neighbourhoods are cosine ones; PCA initialisation,
perplexity min(30, (n - 1) / 3) (it must stay below n), 500 iterations, ``random_state = seed``,
one OpenMP thread. One colour per class.

knn_neighbours.png: Q val queries (seeded, spread across classes), each followed by its top-k train
images by cosine similarity s_j = <f_q, f_j> (`pretrain.monitor.exact_neighbours`: the neighbours
the weighted k-NN classifier votes with), framed green when their class is the query's, red
otherwise. Tiles show the images as the model saw them (the centre crop).

The train split is searched whole up to ``max_train`` images, else in a seeded class-stratified
sample (the caption says which). Whole splits go through the extractor exactly as `evaluate.knn`
sends them, so an extractor whose cache the k-NN evaluator filled (eval-all's results/<run>/features,
the CLI's default) returns them without a pass over the images.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.lines import Line2D
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from common.atomic import atomic_write_text
from common.errors import UserError, run_cli
from common.knn import exact_neighbours
from data.imagefolder import ImageFolder
from evaluate.eval_plan import EvalOptions, ModelInfo, plan_classification, read_suite
from evaluate.features import FeatureExtractor, FeatureSpec, ImageList, as_extractor
from evaluate.knn import knn_datasets
from evaluate.model_source import add_evaluator_arguments, feature_extractor, load_model

from .figures import FigureFile, FigureSet, plt, print_outcome, save_figure, tile_grid, to_uint8, with_border

MAX_PERPLEXITY = 30.0
TSNE_ITERATIONS = 500
MAX_TRAIN = 20000
MAX_LEGEND_CLASSES = 20


@dataclass
class SplitFeatures:
    """One split as extracted: ``images`` (dataset of (view, _)), ``features`` (N, D) unit rows,
    ``labels`` (N,) class indices, ``total`` images in the split before any subsampling."""
    images: torch.utils.data.Dataset
    features: torch.Tensor
    labels: np.ndarray
    total: int

    def extent(self) -> str:
        """How much of the split this is, for captions: 'all N' or 'a class-stratified sample of n of the N'."""
        return f"a class-stratified sample of {len(self.labels)} of the {self.total}" if len(self.labels) < self.total \
            else f"all {self.total}"


def knn_crop_size(root, trained_crop: int | None = None) -> int:
    """The crop side `evaluate.eval_plan` gives the k-NN evaluator for the classification folder ``root``."""
    folder = Path(root)
    model = ModelInfo(arch="", patch=None, embed_dim=0, crop_size=trained_crop)
    return plan_classification(folder, read_suite(folder), model, EvalOptions())[0].settings["image_size"]


def stratified_subsample(labels, count: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of min(count, N) items spread over the classes as evenly as their sizes allow.

    Classes are filled smallest first, each taking an equal share of what is still wanted, so a
    small class passes its unused share on; equal sizes are ordered at random (``seed``), which
    decides who gets the remainder. Within a class the items are drawn uniformly without replacement.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    order = rng.permutation(len(classes))
    order = order[np.argsort(sizes[order], kind="stable")]
    wanted, chosen = min(count, len(labels)), [np.zeros(0, dtype=np.int64)]
    for position, c in enumerate(order):
        take = min(sizes[c], wanted // (len(order) - position))
        chosen.append(rng.choice(np.flatnonzero(labels == classes[c]), take, replace=False))
        wanted -= take
    return np.sort(np.concatenate(chosen))


def split_features(extractor: FeatureExtractor, images: ImageFolder, split: str, cap: int, seed: int) -> SplitFeatures:
    """[CLS] features of a whole split, or of a `stratified_subsample` of ``cap`` images when it is larger."""
    labels = np.asarray(images.targets)
    dataset = images
    if len(images) > cap:
        keep = stratified_subsample(labels, cap, seed)
        dataset = ImageList([images.samples[i][0] for i in keep], images.transform)
        labels = labels[keep]
    features, _ = extractor(dataset, FeatureSpec("cls"), split)
    return SplitFeatures(dataset, F.normalize(features.float(), dim=1), labels, len(images))


def tsne_coordinates(features: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, float]:
    """(n, 2) t-SNE of the unit rows of ``features`` (n, D), and the perplexity used (module docstring)."""
    n = len(features)
    perplexity = min(MAX_PERPLEXITY, max(n - 1, 1) / 3)
    if n < 2:
        return np.zeros((n, 2), np.float32), perplexity
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=TSNE_ITERATIONS, random_state=seed)
    # one OpenMP thread: torch's libgomp threads, still spinning after the extraction, otherwise fight
    # scikit-learn's own libgomp copy for the cores (5x slower on 2 cores)
    with threadpool_limits(1, user_api="openmp"):
        return tsne.fit_transform(features.double().numpy()).astype(np.float32), perplexity


def neighbour_marks(train_features: torch.Tensor, train_labels, query_features: torch.Tensor, query_labels,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Each query's top-k train neighbours by cosine similarity (unit rows), and how to mark them.

    Returns (similarities (Q, k'), indices (Q, k'), marks), k' = min(k, N train), marks[q][j]
    'positive' when neighbour j has query q's class, else 'negative'.
    """
    similarities, indices = exact_neighbours(train_features, query_features, k)
    same_class = np.asarray(train_labels)[indices.numpy()] == np.asarray(query_labels)[:, None]
    return similarities, indices, [["positive" if same else "negative" for same in row] for row in same_class]


def neighbour_rows(train: SplitFeatures, val: SplitFeatures, queries, similarities, indices, marks,
                   classes: list[str]) -> list[list[tuple[np.ndarray, str]]]:
    """`tile_grid` rows: the query (blue frame) then its neighbours (framed by their marks), labelled."""
    rows = []
    for q, query in enumerate(queries):
        query_view = to_uint8(val.images[query][0])
        width = max(2, round(query_view.shape[0] / 16))
        row = [(with_border(query_view, "query", width), f"query: {classes[val.labels[query]]}")]
        for j, mark in enumerate(marks[q]):
            neighbour = int(indices[q, j])
            row.append((with_border(to_uint8(train.images[neighbour][0]), mark, width),
                        f"{classes[train.labels[neighbour]]}  {similarities[q, j]:.4f}"))
        rows.append(row)
    return rows


def class_colours(num_classes: int) -> np.ndarray:
    """(C, 4) RGBA: tab10 / tab20 for up to 10 / 20 classes, evenly spaced turbo beyond."""
    if num_classes <= 20:
        return plt.get_cmap("tab10" if num_classes <= 10 else "tab20")(np.arange(num_classes))
    return plt.get_cmap("turbo")(np.linspace(0, 1, num_classes))


def draw_tsne(coordinates: np.ndarray, labels: np.ndarray, classes: list[str], title: str):
    """A scatter of the (n, 2) ``coordinates``, one colour per class, with a legend up to 20 classes."""
    colours = class_colours(len(classes))
    fig, axis = plt.subplots(figsize=(7.5, 6))
    size = float(np.clip(4000 / max(len(labels), 1), 6, 60))
    axis.scatter(coordinates[:, 0], coordinates[:, 1], s=size, c=colours[labels], alpha=0.8, linewidths=0)
    if len(classes) <= MAX_LEGEND_CLASSES:
        handles = [Line2D([], [], marker="o", linestyle="", color=colours[c], label=name)
                   for c, name in enumerate(classes) if (labels == c).any()]
        axis.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_tsne(val: SplitFeatures, classes: list[str], out: Path, seed: int, view: str) -> FigureFile:
    """``out``/tsne.png: the t-SNE of the val features, coloured by class."""
    coordinates, perplexity = tsne_coordinates(val.features, seed)
    title = f"t-SNE of {len(val.labels)} val features, {len(classes)} classes"
    path = save_figure(draw_tsne(coordinates, val.labels, classes, title), out / "tsne.png")
    legend = "legend: class names" if len(classes) <= MAX_LEGEND_CLASSES else "no legend beyond 20 classes"
    return FigureFile(path, "t-SNE of val features by class",
                      f"2-D t-SNE (PCA init, perplexity {perplexity:.3g}, {TSNE_ITERATIONS} iterations, seed {seed}) "
                      f"of the {view} of {val.extent()} val images; one colour per class ({len(classes)} classes; "
                      f"{legend}).")


def write_neighbour_grid(train: SplitFeatures, val: SplitFeatures, classes: list[str], out: Path, queries: int,
                         k: int, seed: int, view: str) -> FigureFile:
    """``out``/knn_neighbours.png: seeded val queries, one per row, then their top-k train neighbours, marked."""
    chosen = stratified_subsample(val.labels, queries, seed)
    chosen = chosen[np.argsort(val.labels[chosen], kind="stable")]
    similarities, indices, marks = neighbour_marks(train.features, train.labels, val.features[chosen],
                                                   val.labels[chosen], k)
    rows = neighbour_rows(train, val, chosen, similarities, indices, marks, classes)
    k_shown = indices.shape[1]
    path = save_figure(tile_grid(rows, title=f"val queries and their top-{k_shown} train neighbours (cosine)"),
                       out / "knn_neighbours.png")
    positives = sum(row.count("positive") for row in marks)
    return FigureFile(path, "k-NN neighbours of val queries",
                      f"{len(chosen)} val queries (blue frame, seed {seed}, spread across classes), each followed by "
                      f"its top-{k_shown} train neighbours by cosine similarity of the {view}, searched among "
                      f"{train.extent()} train images; green frame = the query's class, red = another class "
                      f"({positives} of {len(chosen) * k_shown} green); label = class and similarity. Images shown "
                      "as the model saw them.")


def embedding_figures(model, classification_root, out_dir, crop_size: int | None = None, device=None,
                      max_points: int = 2000, queries: int = 8, k: int = 5, seed: int = 0, progress: bool = True,
                      max_train: int = MAX_TRAIN) -> FigureSet:
    """Write ``out_dir``/tsne.png and ``out_dir``/knn_neighbours.png for ``model`` on a train/val ImageFolder.

    ``model``: a backbone (fp32, uncached) or a `FeatureExtractor` (pass eval-all's, with its cache, to reuse
    the k-NN evaluator's features); ``crop_size`` None: `knn_crop_size`.
    """
    if min(max_points, queries, k, max_train) < 1:
        raise UserError(f"max points, queries, k and max train must be at least 1, got {max_points}, {queries}, "
                        f"{k}, {max_train}: pass positive values")
    crop = crop_size or knn_crop_size(classification_root)
    train_set, val_set = knn_datasets(classification_root, crop)
    extractor = as_extractor(model, device, progress=progress)
    train = split_features(extractor, train_set, "train", max_train, seed)
    val = split_features(extractor, val_set, "val", max_points, seed)
    view, classes = f"[CLS] features (L2-normalised) of the {crop}-px centre crop", train_set.classes
    figures = [write_tsne(val, classes, Path(out_dir), seed, view),
               write_neighbour_grid(train, val, classes, Path(out_dir), queries, k, seed, view)]
    problems = [f"class '{name}' has no val images: absent from the t-SNE and the queries"
                for c, name in enumerate(classes) if not (val.labels == c).any()]
    return FigureSet(figures, problems)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="t-SNE of features coloured by class, and k-NN neighbour grids")
    add_evaluator_arguments(parser)
    parser.add_argument("--data", required=True, help="folder with train/<class>/... and val/<class>/...")
    parser.add_argument("--out", default=None, help="figure folder (default results/<run>/embeddings)")
    parser.add_argument("--max-points", type=int, default=2000, help="val points in the t-SNE (stratified sample)")
    parser.add_argument("--queries", type=int, default=8, help="rows of the neighbour grid")
    parser.add_argument("-k", type=int, default=5, help="neighbours per query")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="centre-crop side (default: the k-NN evaluator's, see evaluate.eval_plan)")
    args = parser.parse_args(argv)
    source = load_model(args)
    extractor = feature_extractor(source, args)
    crop = args.crop_size or knn_crop_size(args.data, source.crop_size)
    out = args.out or source.results_dir("embeddings")
    result = embedding_figures(extractor, args.data, out, crop, max_points=args.max_points,
                               queries=args.queries, k=args.k, seed=args.seed)
    if args.json:
        figures = [{**asdict(figure), "path": str(figure.path)} for figure in result.figures]
        atomic_write_text(args.json, json.dumps({"figures": figures, "problems": result.problems}, indent=2))
    return print_outcome(result)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
