"""eval-all on a tiny generated suite: the tables, agreement with the evaluators, skips, FORCE, bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from evaluator_trees import save_tiny_checkpoint, tiny_vit, write_tiny_suite

from common.errors import run_cli
from evaluate import eval_all
from evaluate import results_table as rt
from evaluate.attention_masks import run_attention_masks
from evaluate.copy_detection import run_copy_detection
from evaluate.demo import DINO, RANDOM, comparison, format_comparison
from evaluate.features import FeatureExtractor, weights_fingerprint
from evaluate.knn import run_knn
from evaluate.linear import run_linear
from evaluate.retrieval import run_retrieval
from evaluate.video_segmentation import PropagationOptions, run_video_segmentation
from pretrain.checkpoint import load_backbone, load_backbone_with_args

LINEAR_EPOCHS = 3
RUNNER_FUNCTIONS = ("run_knn", "run_linear", "run_retrieval", "run_copy_detection", "run_video_segmentation",
                    "run_attention_masks")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """Every suite part at tiny sizes, and a tiny ViT checkpoint (patch 8, width 32, trained crop 32)."""
    root = tmp_path_factory.mktemp("eval_all")
    data = write_tiny_suite(root / "suite")
    checkpoint = save_tiny_checkpoint(root / "runs" / "tiny" / "checkpoint.pth")
    return data, checkpoint


def run_eval_all(capsys, *argv):
    """(exit status, stdout, stderr) of ``python -m evaluate.eval_all`` with quiet, worker-free defaults."""
    status = run_cli(eval_all.main, [str(arg) for arg in ("--num-workers", 0, "--no-progress", "--linear-epochs",
                                                          LINEAR_EPOCHS, *argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def measured(out, table, method):
    frame = rt.read_table(out / f"{table}.csv")
    rows = frame[(frame["source"] == "measured") & (frame["method"] == method)]
    return dict(zip(rows["metric"], rows["value"])), rows, frame


@pytest.fixture(scope="module")
def first_run(tiny_root, tmp_path_factory):
    data, checkpoint = tiny_root
    out = tmp_path_factory.mktemp("results") / "tiny"
    status = run_cli(eval_all.main, [str(arg) for arg in ("--ckpt", checkpoint, "--data-root", data, "--out", out,
                                                          "--num-workers", 0, "--no-progress",
                                                          "--linear-epochs", LINEAR_EPOCHS)])
    assert status == 0
    return out


def test_tables_hold_measured_and_paper_rows(first_run):
    out = first_run
    expected = {"table2_linear_knn": {"knn_top1", "knn_top5", "linear_top1", "linear_top5"},
                "table3_retrieval": {"rsynth_mAP_medium", "rsynth_mAP_hard"},
                "table4_copy_detection": {"copydays_strong_mAP"},
                "table5_davis": {"J&F_mean", "J_mean", "F_mean", "J_recall", "J_decay", "F_recall", "F_decay"},
                "voc_attention_jaccard": {"voc12_jaccard"}}
    for table, metrics in expected.items():
        values, rows, frame = measured(out, table, "tiny")
        assert metrics <= set(values), table
        assert set(values) - metrics <= {"rsynth_mAP_easy"}
        assert (rows["arch"] == "vit").all() and (rows["patch"] == "8").all()
        assert (frame["source"] == "paper").sum() == len(rt.load_reference(table))
    _, rows, _ = measured(out, "table4_copy_detection", "tiny")
    assert rows[["dim", "resolution"]].values.tolist() == [["64", "96x96"]]  # 2 x width; 96 = suite short side
    _, rows, _ = measured(out, "voc_attention_jaccard", "tiny")
    assert rows["mass"].tolist() == ["0.6"]
    record = json.loads((out / "eval_all" / "tiny.json").read_text())
    assert set(record) == {"knn", "linear", "retrieval:rsynth", "copy_detection", "davis", "voc"}
    assert record["knn"]["identity"]["settings"]["image_size"] == 32  # the checkpoint's crop size
    assert record["davis"]["identity"]["settings"] == {"frame_height": 72, "side_multiple": 8}
    assert set(record["knn"]["details"]) == {"k10", "k20", "k100", "k200"}


def test_measured_values_equal_the_evaluators_called_directly(tiny_root, first_run, tmp_path):
    data, checkpoint = tiny_root
    model = load_backbone(checkpoint)
    extractor = FeatureExtractor(model, "cpu", num_workers=0, progress=False)  # no cache: the other path
    direct = {}
    top1, top5 = run_knn(model, data / "classification", 32, batch_size=64, ks=(20,), num_workers=0)[20]
    direct.update(knn_top1=top1, knn_top5=top5)
    probes = [run_linear(extractor, data / "classification", 32, epochs=LINEAR_EPOCHS, batch_size=256,
                         base_lr=lr, augment=False) for lr in (1e-3, 1e-2, 1e-1)]  # the suite's lr sweep
    direct.update(max(probes, key=lambda probe: probe.top1).metrics())
    direct.update(run_retrieval(extractor, data / "retrieval", "rsynth", imsize=128))
    direct.update(copydays_strong_mAP=run_copy_detection(
        extractor, data / "copydays", 96, data / "copydays" / "distractors",
        data / "copydays" / "whitening")["copydays_strong_mAP"])
    direct.update(run_video_segmentation(model, data / "davis", tmp_path / "davis",
                                         options=PropagationOptions(72, 8), progress=False))
    direct.update(run_attention_masks(model, data / "voc", image_size=96, num_workers=0, progress=False))
    table_values = {}
    for table in rt.TABLES:
        table_values.update(measured(first_run, table, "tiny")[0])
    for metric, value in direct.items():
        assert table_values[metric] == pytest.approx(value, abs=1e-9), metric


def test_rerun_skips_and_force_recomputes(tiny_root, first_run, monkeypatch, capsys):
    data, checkpoint = tiny_root
    before = {path.name: path.read_bytes() for path in first_run.glob("*.csv")}

    def must_not_run(*args, **kwargs):
        raise AssertionError("an evaluator ran again although its results are in the table")
    for name in RUNNER_FUNCTIONS:
        monkeypatch.setattr(eval_all, name, must_not_run)
    status, out, _ = run_eval_all(capsys, "--ckpt", checkpoint, "--data-root", data, "--out", first_run)
    assert status == 0 and out.count("skipped") == 6
    assert {path.name: path.read_bytes() for path in first_run.glob("*.csv")} == before
    monkeypatch.undo()

    calls = []
    for name in ("run_knn", "run_video_segmentation"):
        real = getattr(eval_all, name)
        monkeypatch.setattr(eval_all, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    status, out, _ = run_eval_all(capsys, "--ckpt", checkpoint, "--data-root", data, "--out", first_run, "--force",
                                  "--only", "knn", "davis")
    assert status == 0 and calls == ["run_knn", "run_video_segmentation"] and "skipped" not in out
    assert measured(first_run, "table2_linear_knn", "tiny")[0]["knn_top1"] == \
        json.loads((first_run / "eval_all" / "tiny.json").read_text())["knn"]["metrics"]["knn_top1"]


def test_other_weights_under_the_same_run_name_are_recomputed(tiny_root, first_run, tmp_path, capsys):
    data, _ = tiny_root
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    retrained = save_tiny_checkpoint(tmp_path / "tiny" / "checkpoint.pth", tiny_vit(seed=1))  # run name 'tiny'
    status, stdout, _ = run_eval_all(capsys, "--ckpt", retrained, "--data-root", data, "--out", out,
                                     "--only", "knn", "davis")
    assert status == 0 and "skipped" not in stdout  # the old DAVIS predictions are replaced, not refused
    record = json.loads((out / "eval_all" / "tiny.json").read_text())
    for name in ("knn", "davis"):
        assert record[name]["weights"] == weights_fingerprint(load_backbone(retrained))
    assert record["voc"]["weights"] != record["knn"]["weights"]  # not asked for: kept as it was


def test_random_twin_lands_beside_the_trained_model(tiny_root, first_run, capsys):
    data, checkpoint = tiny_root
    status, out, _ = run_eval_all(capsys, "--random-like", checkpoint, "--data-root", data, "--out", first_run,
                                  "--only", "knn")
    assert status == 0 and "random init (vit)" in out and "tiny" in out  # the summary shows both models
    values, _, _ = measured(first_run, "table2_linear_knn", "random init (vit)")
    torch.manual_seed(0)  # eval-all's default --seed draws the twin
    model, _ = load_backbone_with_args(checkpoint, random_weights=True)
    assert values["knn_top1"] == pytest.approx(run_knn(model, data / "classification", 32, 64, (20,),
                                                       num_workers=0)[20][0], abs=1e-9)


def test_broken_part_is_reported_and_the_others_still_run(tiny_root, tmp_path, capsys):
    data, checkpoint = tiny_root
    root = tmp_path / "data"
    shutil.copytree(data / "classification", root / "classification")
    shutil.copytree(data / "retrieval", root / "retrieval")
    (root / "retrieval" / "rsynth" / "gnd_rsynth.pkl").write_bytes(b"not a pickle")
    shutil.copytree(data / "davis", root / "davis")
    (root / "davis" / "ImageSets" / "2017" / "val.txt").unlink()
    out = tmp_path / "out"
    status, stdout, _ = run_eval_all(capsys, "--ckpt", checkpoint, "--data-root", root, "--out", out,
                                     "--only", "knn", "retrieval", "davis")
    assert status == 1
    assert "gnd_rsynth.pkl" in stdout and "val.txt" in stdout and "2 of 3 evaluations failed" in stdout
    assert set(measured(out, "table2_linear_knn", "tiny")[0]) == {"knn_top1", "knn_top5"}
    assert not (out / "table3_retrieval.csv").exists() and not (out / "table5_davis.csv").exists()


def test_bad_inputs_are_one_line_errors(tiny_root, tmp_path, capsys):
    data, checkpoint = tiny_root
    (tmp_path / "empty").mkdir()
    status, _, err = run_eval_all(capsys, "--ckpt", checkpoint, "--data-root", tmp_path / "empty",
                                  "--out", tmp_path / "out")
    assert status == 2 and err.count("\n") == 1 and "holds none of the evaluation parts" in err
    status, _, err = run_eval_all(capsys, "--ckpt", checkpoint, "--data-root", tmp_path / "missing",
                                  "--out", tmp_path / "out")
    assert status == 2 and err.count("\n") == 1 and "missing" in err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"definitely not a checkpoint")
    status, _, err = run_eval_all(capsys, "--ckpt", broken, "--data-root", data, "--out", tmp_path / "out")
    assert status == 2 and err.count("\n") == 1 and "broken.pth" in err
    assert not (tmp_path / "out").exists()


def test_demo_comparison_table():
    def outcome(name, metrics, seconds):
        return eval_all.Outcome(name, "t", "done", metrics, seconds, headline=tuple(metrics)[:2])
    random = [outcome("knn", {"knn_top1": 20.0, "knn_top5": 60.0}, 1.0), outcome("voc", {"voc12_jaccard": 10.0}, 2.0)]
    dino = [outcome("knn", {"knn_top1": 35.5, "knn_top5": 70.0}, 1.5), outcome("voc", {"voc12_jaccard": 8.0}, 2.5)]
    rows = comparison(random, dino)
    assert rows["knn_top1"][DINO] - rows["knn_top1"][RANDOM] == rows["knn_top1"]["difference"] == 15.5
    assert rows["voc12_jaccard"]["difference"] == -2.0
    lines = format_comparison(rows).splitlines()
    assert lines[2].split()[:4] == ["knn_top1", "20.00", "35.50", "+15.50"] and "1.0 s / 1.5 s" in lines[2]
    assert "s /" not in lines[3]  # the evaluator's time is shown once
