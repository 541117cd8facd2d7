"""analysis.embeddings: stratified sampling, neighbours and their marks, t-SNE, the figures, bad input, the CLI."""
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from figure_checks import assert_not_blank

from analysis.embeddings import (
    embedding_figures,
    knn_crop_size,
    main,
    neighbour_marks,
    neighbour_rows,
    split_features,
    stratified_subsample,
    tsne_coordinates,
)
from analysis.figures import MARKS
from common.errors import UserError, run_cli
from evaluate.features import FeatureExtractor
from evaluate.knn import knn_datasets

COLOURS = {"blue": (20, 20, 220), "green": (20, 220, 20), "red": (220, 20, 20)}  # sorted: labels 0, 1, 2


class ColourMeans(torch.nn.Module):
    """The mean of each (normalised) channel: solid colours of different hue point different ways."""

    def forward(self, images):
        return images.mean(dim=(2, 3))


def write_colour_folder(root, per_split=(("train", 6), ("val", 4)), colours=COLOURS, side=8):
    """train/<colour>/ and val/<colour>/ of solid ``side``-px images, each a little brighter or darker."""
    rng = np.random.default_rng(0)
    for split, count in per_split:
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.integers(-15, 16), 0, 255).astype(np.uint8)
                PIL.Image.fromarray(np.tile(pixels, (side, side, 1))).save(root / split / name / f"{i}.png")
    return root


def test_stratified_subsample_counts_and_seed():
    labels = np.repeat([0, 1, 2], [5, 20, 20])
    chosen = stratified_subsample(labels, 20, seed=3)
    assert len(np.unique(chosen)) == 20 and np.all(np.diff(chosen) > 0)
    assert sorted(np.bincount(labels[chosen]).tolist()) == [5, 7, 8]  # the small class passes its share on
    assert np.array_equal(chosen, stratified_subsample(labels, 20, seed=3))
    assert not all(np.array_equal(chosen, stratified_subsample(labels, 20, seed=s)) for s in range(4, 8))
    assert np.array_equal(stratified_subsample(labels, 100, seed=0), np.arange(45))
    spread = stratified_subsample(np.repeat(np.arange(10), 3), 4, seed=0)
    assert len(set((spread // 3).tolist())) == 4  # 4 items from 4 different classes
    even = stratified_subsample(np.repeat(np.arange(4), 10), 12, seed=1)
    assert np.bincount(even // 10).tolist() == [3, 3, 3, 3]


def test_neighbour_marks_equal_brute_force():
    rng = np.random.default_rng(0)
    train = F.normalize(torch.tensor(rng.normal(size=(40, 6)), dtype=torch.float32), dim=1)
    queries = F.normalize(torch.tensor(rng.normal(size=(7, 6)), dtype=torch.float32), dim=1)
    train_labels, query_labels = rng.integers(0, 3, 40), rng.integers(0, 3, 7)
    similarities, indices, marks = neighbour_marks(train, train_labels, queries, query_labels, k=5)
    for q in range(7):
        cosines = train.numpy() @ queries[q].numpy()
        top = np.argsort(-cosines, kind="stable")[:5]
        assert indices[q].tolist() == top.tolist()
        assert similarities[q].numpy() == pytest.approx(cosines[top], abs=1e-6)
        assert marks[q] == ["positive" if train_labels[j] == query_labels[q] else "negative" for j in top]
    assert neighbour_marks(train[:3], train_labels[:3], queries, query_labels, k=5)[1].shape == (7, 3)


def test_tsne_separates_clusters_and_handles_tiny_sets():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 5
    labels = np.repeat(np.arange(3), 10)
    points = F.normalize(torch.tensor(centres[labels] + rng.normal(size=(30, 16)) * 0.2, dtype=torch.float32), dim=1)
    coordinates, perplexity = tsne_coordinates(points, seed=0)
    assert coordinates.shape == (30, 2) and perplexity == pytest.approx(29 / 3)
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=-1) + np.eye(30) * 1e9
    assert np.array_equal(labels[distances.argmin(axis=1)], labels)  # every nearest 2-D neighbour shares the class
    assert np.array_equal(coordinates, tsne_coordinates(points, seed=0)[0])
    for n in (1, 2, 3):
        tiny, tiny_perplexity = tsne_coordinates(points[:n], seed=0)
        assert tiny.shape == (n, 2) and np.isfinite(tiny).all() and tiny_perplexity < max(n, 2)


def test_neighbour_tiles_are_framed_by_class(tmp_path):
    root = write_colour_folder(tmp_path / "colours")
    train_set, val_set = knn_datasets(root, 8)
    extractor = FeatureExtractor(ColourMeans(), "cpu", num_workers=0, progress=False)
    train, val = (split_features(extractor, images, split, 100, 0)
                  for images, split in ((train_set, "train"), (val_set, "val")))
    queries = [0, 4, 8]  # the first val image of blue, green, red
    train_labels_first = train.labels.copy()
    train.labels[0] = 2  # pretend the first blue train image is red: it must come out framed red
    similarities, indices, marks = neighbour_marks(train.features, train.labels, val.features[queries],
                                                   val.labels[queries], k=6)
    rows = neighbour_rows(train, val, queries, similarities, indices, marks, train_set.classes)
    assert [row[0][1] for row in rows] == ["query: blue", "query: green", "query: red"]
    for q, row in enumerate(rows):
        assert tuple(row[0][0][0, 0]) == MARKS["query"]
        for j, (tile, label) in enumerate(row[1:]):
            neighbour = int(indices[q, j])
            assert train_labels_first[neighbour] == val.labels[queries[q]]  # colour means find the same colour
            expected = "positive" if train.labels[neighbour] == val.labels[queries[q]] else "negative"
            assert tuple(tile[0, 0]) == MARKS[expected] and tuple(tile[-1, -1]) == MARKS[expected]
            assert label.startswith(train_set.classes[train.labels[neighbour]])
    assert marks[0].count("negative") == 1 and all(m == "positive" for row in marks[1:] for m in row)


def test_embedding_figures_on_solid_colours(tmp_path):
    root = write_colour_folder(tmp_path / "colours")
    result = embedding_figures(ColourMeans(), root, tmp_path / "out", crop_size=8, device="cpu", max_points=6,
                               queries=3, k=4, seed=0, progress=False, max_train=9)
    tsne, grid = result.figures
    assert [f.path.name for f in result.figures] == ["tsne.png", "knn_neighbours.png"] and result.problems == []
    for figure in result.figures:
        assert_not_blank(figure.path)
    assert "a class-stratified sample of 6 of the 12 val images" in tsne.caption
    assert "perplexity 1.67" in tsne.caption and "3 classes" in tsne.caption
    assert "a class-stratified sample of 9 of the 18 train images" in grid.caption
    # 3 train images per class are searched: each query's 4th neighbour has another colour
    assert "top-4 train neighbours" in grid.caption and "(9 of 12 green)" in grid.caption


def test_one_class_and_a_class_without_val_images(tmp_path):
    root = write_colour_folder(tmp_path / "one", per_split=(("train", 3), ("val", 2)), colours={"red": (220, 20, 20)})
    extractor = FeatureExtractor(ColourMeans(), "cpu", num_workers=0, progress=False)  # then no model is needed
    result = embedding_figures(extractor, root, tmp_path / "out1", crop_size=8)
    assert "1 classes" in result.figures[0].caption and "(6 of 6 green)" in result.figures[1].caption
    assert_not_blank(result.figures[0].path)
    root = write_colour_folder(tmp_path / "two", per_split=(("train", 3), ("val", 2)))
    for image in (root / "val" / "green").iterdir():
        image.unlink()
    result = embedding_figures(extractor, root, tmp_path / "out2", crop_size=8)
    assert result.problems == ["class 'green' has no val images: absent from the t-SNE and the queries"]


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("no_val", "lacks"),
    ("empty", "no image files"),
    ("mismatch", "different class folders"),
])
def test_bad_roots_raise_one_line(tmp_path, layout, message):
    root = tmp_path / "root"
    if layout == "no_val":
        (root / "train" / "a").mkdir(parents=True)
    elif layout == "empty":
        for split in ("train", "val"):
            (root / split / "a").mkdir(parents=True)
    elif layout == "mismatch":
        write_colour_folder(root)
        (root / "val" / "red").rename(root / "val" / "crimson")
    with pytest.raises(UserError, match=message) as error:
        embedding_figures(ColourMeans(), root, tmp_path / "out", crop_size=8, progress=False)
    assert "\n" not in str(error.value) and ":" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_crop_follows_the_knn_plan(tmp_path):
    root = write_colour_folder(tmp_path / "colours")
    assert knn_crop_size(root) == 224 and knn_crop_size(root, trained_crop=32) == 224  # real data: the paper's
    (root / "SUITE.json").write_text(json.dumps({"image_size": 16}))
    assert knn_crop_size(root) == 16 and knn_crop_size(root, trained_crop=12) == 12  # suite: the trained crop


def test_cli_writes_figures_and_fails_in_one_line(tmp_path, capsys, monkeypatch):
    root = write_colour_folder(tmp_path / "colours")
    monkeypatch.chdir(tmp_path)
    argv = ["--ckpt", "random", "--arch", "vit_tiny", "--patch", "8", "--data", str(root), "--crop-size", "8",
            "--queries", "2", "-k", "3", "--no-cache", "--num-workers", "0", "--json", "figures.json"]
    assert run_cli(main, argv) == 0
    listed = json.loads((tmp_path / "figures.json").read_text())
    out = Path("results") / "random-vit_tiny-p8" / "embeddings"  # the default --out
    assert [figure["path"] for figure in listed["figures"]] == [str(out / "tsne.png"), str(out / "knn_neighbours.png")]
    assert "2 val queries" in listed["figures"][1]["caption"] and "8-px centre crop" in listed["figures"][0]["caption"]
    for figure in listed["figures"]:
        assert_not_blank(tmp_path / figure["path"])
    capsys.readouterr()
    assert run_cli(main, argv[:6] + ["--data", str(tmp_path / "nowhere")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: evaluation data directory") and "nowhere" in stderr
