"""analysis.neighbours and analysis.propagation: statuses, rankings against the evaluators, marks, overlays, J, CLIs."""
import numpy as np
import PIL.Image
import pytest
import torch
from evaluator_trees import (
    pattern_image,
    run_main,
    save_image,
    save_tiny_checkpoint,
    tiny_vit,
    write_copydays_tree,
    write_revisitop_tree,
)
from figure_checks import assert_not_blank

from analysis.figures import MARKS
from analysis.neighbours import (
    BOX_COLOUR,
    copy_detection_cells,
    copy_detection_figures,
    copy_detection_rows,
    retrieval_cells,
    retrieval_figures,
    retrieval_rows,
    retrieval_statuses,
)
from analysis.neighbours import main as neighbours_main
from analysis.propagation import grey, overlay_labels, propagation_figures, sequence_panels
from analysis.propagation import main as propagation_main
from common.errors import UserError
from data.copydays import Copydays
from data.davis import Davis, davis_palette, write_index_mask
from data.revisitop import QueryGroundTruth, RevisitopDataset
from evaluate.copy_detection import run_copy_detection
from evaluate.features import FeatureExtractor
from evaluate.metrics import copy_detection_map, region_similarity, score_sequence
from evaluate.retrieval import dataset_features, rank_database, retrieval_transform


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(tiny_vit(), "cpu", num_workers=0, progress=False)


@pytest.fixture(scope="module")
def revisitop(tmp_path_factory):
    """``<tmp>/tiny``: query q is a copy of database image 2q (easy), 2q + 1 is its hard positive."""
    root = tmp_path_factory.mktemp("revisitop")
    write_revisitop_tree(root, "tiny", n_database=8, n_queries=3)
    return root / "tiny"


def test_statuses_under_medium_hard_and_easy():
    gnd = {"easy": [0, 4], "hard": [1], "junk": [2]}
    order = [4, 3, 2, 1, 0, 5]
    assert retrieval_statuses(gnd, order, "medium") == ["easy", "negative", "junk", "hard", "easy", "negative"]
    assert retrieval_statuses(gnd, order, "hard") == ["junk", "negative", "junk", "hard", "junk", "negative"]
    assert retrieval_statuses(gnd, order, "easy") == ["easy", "negative", "junk", "junk", "easy", "negative"]
    as_read = QueryGroundTruth(bbx=(0, 0, 1, 1), easy=np.array([0, 4]), hard=np.array([1]), junk=np.array([2]))
    assert retrieval_statuses(as_read, order, "hard") == retrieval_statuses(gnd, order, "hard")


def test_retrieval_ranking_is_the_evaluators_and_tiles_carry_the_marks(revisitop, extractor, tmp_path):
    dataset = RevisitopDataset(revisitop.parent, "tiny")
    rows = retrieval_rows(extractor, dataset, [0, 1, 2], k=8, protocol="medium", imsize=64, multiscale=False)
    evaluator_ranks = rank_database(*dataset_features(extractor, dataset, 64, False))
    transform = retrieval_transform(64)
    with torch.no_grad():  # brute force, image by image, without the evaluator's code
        features = [extractor.model(transform(PIL.Image.open(path).convert("RGB"))[None])[0].double()
                    for path in dataset.database_paths + dataset.query_paths]
    for row in rows:
        assert row.neighbours == evaluator_ranks[:, row.query].tolist()
        query = features[8 + row.query]
        brute = sorted(range(8), key=lambda i: -float(torch.cosine_similarity(features[i], query, dim=0)))
        assert row.neighbours == brute
        assert row.neighbours[0] == 2 * row.query and row.similarities[0] == pytest.approx(1.0)  # its exact copy
        assert row.similarities == sorted(row.similarities, reverse=True)
        assert row.marks[0] == "easy" and row.first_positive == 1
        assert row.marks[row.neighbours.index(2 * row.query + 1)] == "hard"
        assert row.marks.count("negative") == 6
    hard_rows = retrieval_rows(extractor, dataset, [1], 8, "hard", 64, False)
    assert hard_rows[0].marks[0] == "junk" and hard_rows[0].marks.count("hard") == 1
    assert hard_rows[0].first_positive == hard_rows[0].neighbours.index(3) + 1

    grid = retrieval_cells(dataset, rows[:2])
    for row, cells in zip(rows, grid):
        query_tile, query_label = cells[0]
        assert tuple(query_tile[0, 0]) == MARKS["query"] and "first positive: #1" in query_label
        assert (query_tile == BOX_COLOUR).all(axis=2).sum() > 20  # the bbx is drawn
        for (tile, label), index, mark in zip(cells[1:], row.neighbours, row.marks):
            assert tuple(tile[0, 0]) == MARKS[mark] and tuple(tile[-1, -1]) == MARKS[mark]
            assert mark in label
        assert cells[1][1].startswith("1. easy 1.0000")

    made = retrieval_figures(extractor, revisitop, tmp_path, queries=2, k=4)  # settings as eval-all plans them
    assert [figure.path for figure in made.figures] == [tmp_path / "retrieval_tiny.png"] and not made.problems
    assert "Medium protocol" in made.figures[0].caption and "thumbnail 224" in made.figures[0].caption
    assert_not_blank(tmp_path / "retrieval_tiny.png")


def test_copy_detection_marks_the_true_original_and_ranks_as_the_evaluator(extractor, tmp_path):
    root = write_copydays_tree(tmp_path / "copydays", n_originals=5,
                               strong_copy=lambda image, index: image.transpose(PIL.Image.FLIP_LEFT_RIGHT))
    for index in range(3):
        save_image(pattern_image(50 + index), root / "distractors" / f"d{index}.jpg")
    for index in range(6):
        save_image(pattern_image(80 + index, size=(36, 36)), root / "whitening" / f"w{index}.jpg")
    copydays = Copydays(root, root / "distractors", root / "whitening")
    rows = copy_detection_rows(extractor, copydays, list(range(5)), k=8, imsize=32)
    for row in rows:  # strong copy i (2000i01) comes from original i (2000i00); 8 = the whole database
        assert sorted(row.neighbours) == list(range(8))
        assert [index for index, mark in zip(row.neighbours, row.marks) if mark == "positive"] == [row.query]
        assert row.first_positive == row.neighbours.index(row.query) + 1
    evaluator = run_copy_detection(extractor, root, 32, root / "distractors", root / "whitening")
    assert evaluator["whitened"] and evaluator["database_size"] == 8
    ours = copy_detection_map([row.neighbours for row in rows], [(row.query,) for row in rows])
    assert ours == pytest.approx(evaluator["block_maps"]["strong"])
    assert ours < 100  # flipped copies are not all found first: the check above is not trivial

    for row, cells in zip(rows, copy_detection_cells(copydays, rows)):
        assert tuple(cells[0][0][0, 0]) == MARKS["query"]
        for (tile, _), index in zip(cells[1:], row.neighbours):
            assert tuple(tile[0, 0]) == MARKS["positive" if index == row.query else "negative"]
    made = copy_detection_figures(extractor, root, tmp_path / "figures", queries=2, k=3, imsize=32)
    assert "PCA-whitened on 6 images" in made.figures[0].caption
    assert "5 originals + 3 distractors" in made.figures[0].caption
    assert_not_blank(tmp_path / "figures" / "copy_detection.png")


# --------------------------------------------------------------- propagation

def write_hand_davis(root, predicted, missing=()):
    """DAVIS tree of 32 x 24 frames, 5 per sequence, object 1 = rows 4:12 x cols 4:12 and object 2 = rows
    14:20 x cols 20:28 in every frame; predictions (not for ``missing``): frame 0 = the annotation, later
    frames object 1 shifted 4 px right (J 1/3), object 2 exact."""
    truth = np.zeros((24, 32), np.uint8)
    truth[4:12, 4:12], truth[14:20, 20:28] = 1, 2
    shifted = np.zeros_like(truth)
    shifted[4:12, 8:16], shifted[14:20, 20:28] = 1, 2
    frame = PIL.Image.new("RGB", (32, 24), (200, 100, 50))
    for sequence in predicted + list(missing):
        for t in range(5):
            save_image(frame, root / "JPEGImages" / "480p" / sequence / f"{t:05d}.jpg")
            write_index_mask(root / "Annotations" / "480p" / sequence / f"{t:05d}.png", truth, davis_palette())
            if sequence in predicted:
                write_index_mask(root / "pred" / sequence / f"{t:05d}.png", shifted if t else truth, davis_palette())
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{name}\n" for name in list(missing) + predicted))
    return truth, shifted


def test_overlay_colours_exactly_the_mask_pixels():
    rgb = np.full((4, 5, 3), 100, np.uint8)
    labels = np.zeros((4, 5), np.uint8)
    labels[1, 1:3], labels[2, 4], labels[3, 0] = 1, 2, 255
    drawn = overlay_labels(rgb, labels, alpha=0.5)
    assert (drawn[1, 1] == [114, 50, 50]).all() and (drawn[1, 2] == [114, 50, 50]).all()  # (100 + (128, 0, 0)) / 2
    assert (drawn[2, 4] == [50, 114, 50]).all()
    untouched = labels == 0
    untouched[3, 0] = True  # void stays as it is
    assert (drawn[untouched] == 100).all()
    assert (grey(np.array([[[200, 100, 50]]], np.uint8)) == 124).all()  # 0.299 R + 0.587 G + 0.114 B


def test_panels_place_the_overlays_on_the_masks_and_j_matches_the_metric(tmp_path):
    truth, shifted = write_hand_davis(tmp_path, ["hand"])
    davis = Davis(tmp_path)
    panels = sequence_panels(davis, tmp_path / "pred", "hand", frames=3)
    assert [panel.name for panel in panels] == ["00000", "00002", "00004"]
    assert [panel.j for panel in panels] == pytest.approx([1.0, 2 / 3, 2 / 3])
    metric_j, metric_f = score_sequence(np.stack([truth] * 2), np.stack([truth, shifted]), 2)
    assert panels[1].j == pytest.approx(metric_j[:, 1].mean()) and panels[1].f == pytest.approx(metric_f[:, 1].mean())
    assert region_similarity(truth == 1, shifted == 1) == pytest.approx(1 / 3)
    base = grey(np.asarray(davis.load_frame("hand", 2)))
    colour = lambda label: np.round(0.4 * base[0, 0] + 0.6 * davis_palette()[label]).astype(np.uint8)  # noqa: E731
    prediction, ground_truth = panels[1].prediction, panels[1].ground_truth
    assert (prediction[4:12, 8:16] == colour(1)).all() and (prediction[14:20, 20:28] == colour(2)).all()
    assert (prediction[4:12, 4:8] == base[4:12, 4:8]).all()  # object 1 of the truth, not predicted there
    assert (ground_truth[4:12, 4:12] == colour(1)).all() and (ground_truth[4:12, 12:16] == base[4:12, 12:16]).all()
    assert (ground_truth[0:4] == base[0:4]).all()


def test_figures_skip_a_sequence_without_predictions_and_refuse_a_missing_folder(tmp_path):
    write_hand_davis(tmp_path, ["hand"], missing=["lost"])
    made = propagation_figures(tmp_path, tmp_path / "pred", tmp_path / "figures", sequences=2, frames=4)
    assert [figure.path.name for figure in made.figures] == ["davis_hand.png"]
    assert len(made.problems) == 1 and "no predictions for sequence 'lost'" in made.problems[0]
    assert_not_blank(tmp_path / "figures" / "davis_hand.png")
    named = propagation_figures(tmp_path, tmp_path / "pred", tmp_path / "figures", sequences=["nowhere", "hand"])
    assert len(named.figures) == 1 and "'nowhere' is not in" in named.problems[0]
    with pytest.raises(UserError, match=r"no DAVIS predictions in '.*absent': run make eval-all first"):
        propagation_figures(tmp_path, tmp_path / "absent", tmp_path / "figures")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no DAVIS predictions in .*run make eval-all first"):
        propagation_figures(tmp_path, tmp_path / "empty", tmp_path / "figures")


# ---------------------------------------------------------------------- CLIs

def test_propagation_cli(tmp_path, capsys):
    write_hand_davis(tmp_path, ["hand"])
    status, err = run_main(propagation_main, ["--davis", tmp_path, "--predictions", tmp_path / "pred"], capsys)
    assert status == 0 and err == ""
    assert_not_blank(tmp_path / "figures" / "davis_hand.png")
    status, err = run_main(propagation_main, ["--davis", tmp_path, "--predictions", tmp_path / "nope"], capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: no DAVIS predictions in")


def test_neighbours_cli_draws_each_part_and_fails_in_one_line(revisitop, tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pth")
    root = tmp_path / "data"
    (root / "retrieval").mkdir(parents=True)
    (root / "retrieval" / "tiny").symlink_to(revisitop, target_is_directory=True)
    write_copydays_tree(root / "copydays", n_originals=3)
    argv = ["--ckpt", ckpt, "--data-root", root, "--out", tmp_path / "figures", "--no-cache", "--k", "3"]
    status, err = run_main(neighbours_main, argv, capsys)
    assert status == 0, err
    for name in ("retrieval_tiny.png", "copy_detection.png"):
        assert_not_blank(tmp_path / "figures" / name)
    status, err = run_main(neighbours_main, ["--ckpt", ckpt, "--data-root", tmp_path / "missing", "--no-cache"], capsys)
    assert status == 2 and err.count("\n") == 1 and "missing" in err and err.startswith("error: ")
