"""Emergence diagnostics: feature geometry and object attention share by hand, the diagnosis, the demo step, the CLI."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from evaluator_trees import save_tiny_checkpoint, tiny_vit, write_tiny_suite, write_voc_tree

from common.errors import UserError, run_cli
from evaluate import demo, emergence
from evaluate.emergence import (
    RANDOM_TWIN,
    ROWS,
    STUDENT,
    TEACHER,
    diagnose,
    feature_geometry,
    format_diagnoses,
    object_attention_share,
    patch_object_fractions,
)
from evaluate.features import FeatureExtractor, FeatureSpec
from evaluate.knn import knn_datasets, run_knn
from evaluate.model_source import load_model_source
from pretrain.backbones import describe
from pretrain.checkpoint import atomic_save, load_backbone_with_args, safe_load


# ---------------------------------------------------------------- feature geometry
def test_identical_directions_have_cosine_one_and_rank_one():
    rows = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.5, 1.0, 1.5]])  # one direction, three lengths
    geometry = feature_geometry(rows)
    assert geometry["mean_pairwise_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert geometry["effective_rank"] == 1.0  # no variance at all: rank 1 by definition


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_orthogonal_equal_variance_directions_have_rank_k(k):
    # +-e_1 .. +-e_k in 8 dimensions: mean 0, covariance 2 / (2k - 1) on k axes, 0 elsewhere
    axes = torch.eye(8)[:k]
    geometry = feature_geometry(torch.cat([axes, -3 * axes]))  # -3: lengths do not matter
    assert geometry["effective_rank"] == pytest.approx(k, abs=1e-6)
    # sum of the unit rows is 0: (0 - 2k) / (2k (2k - 1))
    assert geometry["mean_pairwise_cosine"] == pytest.approx(-1 / (2 * k - 1), abs=1e-12)


def test_a_two_dimensional_case_by_hand():
    # unit rows (1, 0), (-1, 0), (0.6, 0.8), (0.6, -0.8): mean (0.3, 0), centred sums of squares 2.36 (x), 1.28 (y),
    # cross term 0 -> p = (59/91, 32/91); pairwise dot products -1, .6, .6, -.6, -.6, -.28: mean -1.28 / 6 = -16/75
    rows = torch.tensor([[2.0, 0.0], [-0.5, 0.0], [3.0, 4.0], [0.6, -0.8]], dtype=torch.float64)
    p = np.array([59 / 91, 32 / 91])
    rank = math.exp(-(p * np.log(p)).sum())
    geometry = feature_geometry(rows)
    assert geometry["mean_pairwise_cosine"] == pytest.approx(-16 / 75, abs=1e-12)
    assert geometry["effective_rank"] == pytest.approx(rank, abs=1e-12)
    angle = 0.7  # rotated: the covariance is no longer diagonal, the numbers do not change
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)
    rotated = feature_geometry(rows @ rotation.T)
    assert rotated["mean_pairwise_cosine"] == pytest.approx(-16 / 75, abs=1e-12)
    assert rotated["effective_rank"] == pytest.approx(rank, abs=1e-12)


def test_closed_form_cosine_matches_the_pairwise_mean():
    features = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = features / features.norm(dim=1, keepdim=True)
    gram = unit @ unit.T
    pairwise = (gram.sum() - gram.diagonal().sum()) / (7 * 6)
    assert feature_geometry(features)["mean_pairwise_cosine"] == pytest.approx(float(pairwise), abs=1e-12)
    assert 1 <= feature_geometry(features)["effective_rank"] <= 5


def test_one_feature_has_no_geometry():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_geometry(torch.ones(1, 4))


# ---------------------------------------------------------------- object attention share
# 32 x 32 images, patch 8: a 4 x 4 grid, patch index = 4 * row + column. Image 'a' (pixels of each patch):
#   patch 0 all object (c 1); patch 1 left half object, right half background (c 1/2); patch 2 all void (dropped);
#   patch 3 top half void, bottom half object (c 32/32 = 1); patch 5 16 object, 16 void, 32 background (c 1/3);
#   the other 11 patches background. Area (15 kept patches): (1 + 1/2 + 1 + 1/3) / 15 = 17/90.
# Image 'b': background only (left out). Image 'c': patch 15 all object, patch 14 all void: area 1/15.
HEAD_0 = {0: 0.3, 2: 0.2, 3: 0.1, 5: 0.1}  # the rest (0.3) spread over the other 12 patches: 0.025 each
#   share_0(a) = (0.3 + 0.025 / 2 + 0.1 + 0.1 / 3) / (1 - 0.2) = (107 / 240) / 0.8 = 107/192
#   share_0(c) = 0.025 / (1 - 0.025) = 1/39
# head 1 is uniform: its share is the area, 17/90 and 1/15
SHARE_0 = 100 * (107 / 192 + 1 / 39) / 2
AREA = 100 * (17 / 90 + 1 / 15) / 2


def head_row(peaks: dict) -> torch.Tensor:
    rest = (1.0 - sum(peaks.values())) / (16 - len(peaks))
    return torch.tensor([peaks.get(i, rest) for i in range(16)], dtype=torch.float64)


class KnownAttention(torch.nn.Module):
    """A 'ViT' whose last-block [CLS] attention over the 16 patches is given per head, for every image."""
    patch_size = 8

    def __init__(self, *heads: dict):
        super().__init__()
        self.heads = heads
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def get_last_selfattention(self, x):
        attn = torch.full((len(x), len(self.heads), 17, 17), 1 / 17, dtype=torch.float64)
        for head, peaks in enumerate(self.heads):
            attn[:, head, 0] = torch.cat([torch.tensor([0.1], dtype=torch.float64), 0.9 * head_row(peaks)])
        return attn


def patch_labels(cells: dict[int, np.ndarray]) -> np.ndarray:
    """A 32 x 32 label map, background but for the given 8 x 8 patches (patch index -> 8 x 8 labels)."""
    labels = np.zeros((32, 32), np.uint8)
    for index, block in cells.items():
        row, column = divmod(index, 4)
        labels[8 * row:8 * row + 8, 8 * column:8 * column + 8] = block
    return labels


def image_a() -> np.ndarray:
    half_object = np.zeros((8, 8), np.uint8)
    half_object[:, :4] = 1
    void_over_object = np.full((8, 8), 2, np.uint8)
    void_over_object[:4] = 255
    mixed = np.zeros((8, 8), np.uint8)
    mixed[0:2], mixed[2:4] = 1, 255
    return patch_labels({0: np.ones((8, 8), np.uint8), 1: half_object, 2: np.full((8, 8), 255, np.uint8),
                         3: void_over_object, 5: mixed})


@pytest.fixture
def hand_built_voc(tmp_path):
    maps = {"a": image_a(), "b": patch_labels({}),
            "c": patch_labels({15: np.full((8, 8), 3, np.uint8), 14: np.full((8, 8), 255, np.uint8)})}
    return write_voc_tree(tmp_path / "voc", {image_id: (labels, labels) for image_id, labels in maps.items()})


def test_patch_object_fractions_leave_void_out():
    fractions, kept = patch_object_fractions(torch.from_numpy(image_a())[None].long(), 8)
    expected = np.zeros(16)
    expected[[0, 1, 3, 5]] = 1, 0.5, 1, 1 / 3
    np.testing.assert_allclose(fractions[0].flatten().numpy(), expected, atol=1e-15)
    assert kept[0].flatten().tolist() == [index != 2 for index in range(16)]


def test_hand_computed_object_shares(hand_built_voc):
    share = object_attention_share(KnownAttention(HEAD_0, {}), hand_built_voc, image_size=32, batch_size=2,
                                   device="cpu")
    assert share["per_head"] == pytest.approx([SHARE_0, AREA], abs=1e-6)  # attention in fp32
    assert share["best_head"] == pytest.approx(SHARE_0, abs=1e-6)
    assert share["object_area"] == pytest.approx(AREA, abs=1e-12)


def test_uniform_attention_gets_exactly_the_object_area(hand_built_voc):
    share = object_attention_share(KnownAttention({}, {}, {}), hand_built_voc, image_size=32, device="cpu")
    assert share["per_head"] == pytest.approx([share["object_area"]] * 3, abs=1e-12)
    assert share["object_area"] == pytest.approx(AREA, abs=1e-12)


def test_no_object_and_no_attention_are_one_line_errors(tmp_path):
    root = write_voc_tree(tmp_path / "voc", {"b": (patch_labels({}), patch_labels({}))})
    with pytest.raises(UserError, match="no image .* has an object"):
        object_attention_share(KnownAttention({}), root, image_size=32, device="cpu")
    with pytest.raises(UserError, match="needs a ViT"):
        object_attention_share(torch.nn.Linear(2, 2), root, image_size=32, device="cpu")


# ---------------------------------------------------------------- one backbone's diagnosis
@pytest.fixture(scope="module")
def tiny_suite_and_checkpoint(tmp_path_factory):
    """Every suite part at tiny sizes (32-px classification, 128 x 96 VOC) and a tiny ViT trained at crop 24."""
    root = tmp_path_factory.mktemp("emergence")
    data = write_tiny_suite(root / "suite")
    checkpoint = save_tiny_checkpoint(root / "runs" / "tiny" / "checkpoint.pth")
    state = safe_load(checkpoint)
    state["args"]["global_crops_size"] = 24
    atomic_save(state, checkpoint)
    return data, checkpoint


def expected_diagnosis(model, data, crop: int) -> dict:
    """The diagnosis from the evaluators called directly: crop ``crop`` for the k-NN, 96 (VOC's short side) for VOC."""
    classification = data / "classification"
    top1 = run_knn(model, str(classification), crop, ks=(20,), num_workers=0)[20][0]
    extractor = FeatureExtractor(model, "cpu", num_workers=0, fp32=True, progress=False)
    val_features, _ = extractor(knn_datasets(classification, crop)[1], FeatureSpec("cls"), "val")
    share = object_attention_share(model, data / "voc", image_size=96, device="cpu")
    return {"knn20_top1": top1, **feature_geometry(val_features), "best_head_object_share": share["best_head"],
            "per_head_object_share": share["per_head"], "object_area": share["object_area"]}


def test_diagnosis_uses_the_trained_crop_and_the_planned_voc_size(tiny_suite_and_checkpoint):
    data, checkpoint = tiny_suite_and_checkpoint
    model, train_args = load_backbone_with_args(checkpoint)
    diagnosis = diagnose(model, data, train_args, device="cpu")
    assert diagnosis["image_sizes"] == {"knn": 24, "voc": 96}
    expected = expected_diagnosis(model, data, 24)
    assert set(diagnosis) == set(ROWS) | {"image_sizes"}
    for key, value in expected.items():
        assert diagnosis[key] == pytest.approx(value, abs=1e-5), key
    assert len(diagnosis["per_head_object_share"]) == 2  # tiny_vit has two heads
    assert 0 < diagnosis["object_area"] < 100 and 1 <= diagnosis["effective_rank"] <= 32
    # no training args: the suite's image size (32)
    untrained = diagnose(model, data, None, device="cpu")
    assert untrained["image_sizes"]["knn"] == 32
    assert untrained["knn20_top1"] == pytest.approx(run_knn(model, str(data / "classification"), 32, ks=(20,),
                                                            num_workers=0)[20][0])


def test_an_extractor_with_eval_alls_cache_is_used_as_is(tiny_suite_and_checkpoint, tmp_path):
    data, checkpoint = tiny_suite_and_checkpoint
    model, train_args = load_backbone_with_args(checkpoint)
    extractor = FeatureExtractor(model, "cpu", num_workers=0, fp32=True, cache_dir=tmp_path / "features",
                                 progress=False)
    diagnosis = diagnose(extractor, data, train_args)
    assert len(list((tmp_path / "features").glob("*.pth"))) == 2  # train and val, val read back for the geometry
    assert diagnosis["knn20_top1"] == pytest.approx(expected_diagnosis(model, data, 24)["knn20_top1"])


def test_absent_parts_are_none(tiny_suite_and_checkpoint, tmp_path):
    data, checkpoint = tiny_suite_and_checkpoint
    model, train_args = load_backbone_with_args(checkpoint)
    only_voc = tmp_path / "only_voc"
    shutil.copytree(data / "voc", only_voc / "voc")
    diagnosis = diagnose(model, only_voc, train_args, device="cpu")
    assert diagnosis["knn20_top1"] is None and diagnosis["effective_rank"] is None
    assert diagnosis["mean_pairwise_cosine"] is None and diagnosis["image_sizes"] == {"knn": None, "voc": 96}
    assert diagnosis["object_area"] == pytest.approx(expected_diagnosis(model, data, 24)["object_area"])
    lines = format_diagnoses({"model": diagnosis}).splitlines()
    assert lines[2].split()[-1] == "-"  # the k-NN row
    with pytest.raises(UserError, match="holds no classification"):
        diagnose(model, tmp_path / "empty_root", train_args)


def test_table_has_one_column_per_model():
    diagnosis = {"knn20_top1": 25.4, "mean_pairwise_cosine": 0.75, "effective_rank": 1.4,
                 "best_head_object_share": 4.06, "per_head_object_share": [2.31, 4.06], "object_area": 11.71}
    lines = format_diagnoses({"random init": {**diagnosis, "knn20_top1": 17.0}, "DINO (teacher)": diagnosis})
    lines = lines.splitlines()
    assert lines[0].split()[-3:] == ["init", "DINO", "(teacher)"]
    assert lines[2].split()[-2:] == ["17.00", "25.40"]
    assert lines[6].split()[-6:] == ["2.3", "/", "4.1", "2.3", "/", "4.1"]
    assert len(lines) == 2 + len(ROWS)


# ---------------------------------------------------------------- make demo's emergence step
def save_teacher_student_checkpoint(path):
    """A training-style checkpoint whose teacher and student differ (tiny ViTs of seeds 0 and 1), crop 24."""
    teacher, student = tiny_vit(0), tiny_vit(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"teacher": {f"backbone.{key}": value for key, value in teacher.state_dict().items()},
                 "student": {f"backbone.{key}": value for key, value in student.state_dict().items()},
                 "args": {"backbone": describe(teacher), "global_crops_size": 24}}, path)
    return path


def assert_diagnosis_of(diagnosis: dict, model, data):
    for key, value in expected_diagnosis(model, data, 24).items():
        assert diagnosis[key] == pytest.approx(value, abs=1e-5), key


def test_demo_diagnoses_the_twin_the_teacher_and_the_student(tiny_suite_and_checkpoint, tmp_path, capsys):
    data, teacher_only = tiny_suite_and_checkpoint
    checkpoint = save_teacher_student_checkpoint(tmp_path / "runs" / "pair" / "checkpoint.pth")
    diagnoses, failed = demo.emergence_of_run(checkpoint, data, tmp_path / "results", seed=0)
    assert failed == [] and list(diagnoses) == [RANDOM_TWIN, TEACHER, STUDENT]
    assert_diagnosis_of(diagnoses[RANDOM_TWIN], load_model_source(random_like=str(checkpoint), seed=0).model, data)
    assert_diagnosis_of(diagnoses[TEACHER], tiny_vit(0), data)
    assert_diagnosis_of(diagnoses[STUDENT], tiny_vit(1), data)
    assert diagnoses[TEACHER]["per_head_object_share"] != diagnoses[STUDENT]["per_head_object_share"]
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["emergence", "random", "init", "DINO", "(teacher)", "DINO", "(student)"]
    assert table[2].split()[-3:] == [f"{diagnoses[name]['knn20_top1']:.2f}" for name in diagnoses]
    # a checkpoint without a student: two columns and one failure line
    diagnoses, failed = demo.emergence_of_run(teacher_only, data, tmp_path / "results-teacher-only")
    assert list(diagnoses) == [RANDOM_TWIN, TEACHER]
    assert len(failed) == 1 and failed[0].startswith("emergence (DINO (student)): ") and "student" in failed[0]


def test_demo_results_keep_their_keys_and_add_the_emergence(tiny_suite_and_checkpoint, tmp_path, monkeypatch):
    data, _ = tiny_suite_and_checkpoint
    run = tmp_path / "runs" / "demo"
    rows = {"knn_top1": {demo.RANDOM: 10.0, demo.DINO: 30.0, "difference": 20.0, "evaluator": "knn",
                         "seconds": {demo.RANDOM: 1.0, demo.DINO: 1.0}}}
    monkeypatch.setattr(demo.suite_cli, "main", lambda argv: 0)  # the suite is there; no pretraining
    monkeypatch.setattr(demo.train_cli, "main", lambda argv: save_teacher_student_checkpoint(run / "checkpoint.pth"))
    monkeypatch.setattr(demo, "evaluate_pair", lambda *args: (rows, []))
    assert demo.main(["--suite", str(data), "--output-dir", str(run), "--results", str(tmp_path / "results")]) == 0
    results = json.loads((run / "demo_results.json").read_text())
    assert set(results) == {"knn_k20", "margin_top1", "metrics", "emergence", "failed", "seconds", "seconds_total"}
    assert results["knn_k20"][demo.DINO]["top1"] == 30.0 and results["margin_top1"] == 20.0
    assert set(results["seconds"]) == {"suite", "pretraining", "evaluation", "emergence"}
    assert list(results["emergence"]) == ["random init", "DINO (teacher)", "DINO (student)"]
    assert_diagnosis_of(results["emergence"]["DINO (student)"], tiny_vit(1), data)
    assert results["emergence"]["DINO (teacher)"]["image_sizes"] == {"knn": 24, "voc": 96}


def test_command_line_prints_and_writes_the_diagnosis(tiny_suite_and_checkpoint, tmp_path, capsys):
    data, checkpoint = tiny_suite_and_checkpoint
    out = tmp_path / "emergence.json"
    status = run_cli(emergence.main, ["--ckpt", str(checkpoint), "--data-root", str(data), "--device", "cpu",
                                      "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    written = json.loads(out.read_text())
    assert list(written) == ["tiny (teacher)"]
    model, train_args = load_backbone_with_args(checkpoint)
    assert written["tiny (teacher)"]["knn20_top1"] == pytest.approx(expected_diagnosis(model, data, 24)["knn20_top1"])
    assert f"{written['tiny (teacher)']['knn20_top1']:.2f}" in printed.splitlines()[2]
    assert "k-NN crop 24, VOC size 96" in printed
    status = run_cli(emergence.main, ["--random-like", str(checkpoint), "--data-root", str(tmp_path / "nothing")])
    assert status == 2 and "holds no classification" in capsys.readouterr().err
