"""Weighted k-NN: a hand-computed case, FAISS against brute force, real CIFAR-10, the command's shared flags."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import cifar10_sample
from evaluator_trees import files_under, run_main, save_tiny_checkpoint

from common.knn import exact_neighbours, knn_scores, weighted_vote
from common.transforms import eval_transform
from data.imagefolder import ImageFolder, split_root
from evaluate.knn import faiss_neighbours, run_knn
from evaluate.knn import main as knn_main
from pretrain import load_backbone


def test_hand_computed_vote():
    # Query (1, 0); train points at angles 0, 60, 90, 180 degrees with labels 0, 1, 1, 0.
    angles = np.deg2rad([0, 60, 90, 180])
    train = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1), dtype=torch.float32)
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    sims, idx = exact_neighbours(train, query, k=3)
    assert idx.tolist() == [[0, 1, 2]]
    scores = weighted_vote(sims, labels[idx], num_classes=2, temperature=0.07)
    assert scores[0, 0].item() == pytest.approx(math.exp(1 / 0.07), rel=1e-6)
    assert scores[0, 1].item() == pytest.approx(math.exp(0.5 / 0.07) + math.exp(0.0), rel=1e-6)
    # T = 1: one class-0 neighbour (e^1 = 2.72) still outweighs two of class 1 (e^0.5 + e^0 = 2.65)
    scores_t1 = weighted_vote(sims, labels[idx], 2, temperature=1.0)
    assert scores_t1[0].tolist() == pytest.approx([math.e, math.exp(0.5) + 1.0])
    result = knn_scores(train, labels, query, torch.tensor([1]), ks=(1, 3), temperature=0.07)
    assert result[1] == (0.0, 0.0)  # top-min(5, k) with k = 1 is top-1
    assert result[3] == (0.0, 100.0)  # class 1 ranks second of two


def test_faiss_equals_brute_force():
    rng = np.random.default_rng(0)
    train = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(500, 32)), dtype=torch.float32), dim=1)
    queries = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(60, 32)), dtype=torch.float32), dim=1)
    labels = torch.tensor(rng.integers(0, 7, size=500))
    test_labels = torch.tensor(rng.integers(0, 7, size=60))
    s_faiss, i_faiss = faiss_neighbours(train, queries, 20)
    s_exact, i_exact = exact_neighbours(train, queries, 20)
    assert torch.equal(i_faiss, i_exact)
    assert torch.allclose(s_faiss, s_exact, atol=1e-5)
    faiss_result = knn_scores(train, labels, queries, test_labels, ks=(10, 20, 100, 200), search=faiss_neighbours)
    exact_result = knn_scores(train, labels, queries, test_labels, ks=(10, 20, 100, 200))
    assert faiss_result == exact_result
    # a direct per-query loop, no shared code
    for k in (10, 20):
        correct = 0
        for q in range(60):
            sims = (train @ queries[q]).numpy().astype(np.float64)
            top = np.argsort(-sims, kind="stable")[:k]
            votes = np.zeros(7)
            for j in top:
                votes[labels[j]] += np.exp(sims[j] / 0.07)
            correct += int(votes.argmax() == test_labels[q])
        assert exact_result[k][0] == pytest.approx(100 * correct / 60)


class Flatten(torch.nn.Module):
    """Raw pixels as features: an architecture-free 'backbone'."""

    def forward(self, x):
        return x.flatten(1)


def test_knn_on_real_cifar10_sample():
    root = cifar10_sample()
    train_dir, val_dir = split_root(root)
    train_set = ImageFolder(train_dir, eval_transform(32))
    assert train_set.classes[:3] == ["airplane", "automobile", "bird"] and len(train_set) == 200
    results = run_knn(Flatten(), str(root), image_size=32, ks=(20,), num_workers=0)
    top1, top5 = results[20]
    # raw-pixel 20-NN on 10 classes x 20 images is weak but above chance (10%)
    assert 12.0 < top1 < 60.0 and top5 > top1


def test_knn_command_takes_the_shared_extraction_flags(tiny_suite, tmp_path, monkeypatch, capsys):
    """--cache-dir writes the train and val features there and re-runs read them; --no-cache writes nothing;
    --fp32 runs (on the CPU it is the default precision, so it hits the same cache); the default cache is
    results/<run>/features."""
    monkeypatch.chdir(tmp_path)  # the default cache folder is relative
    checkpoint = save_tiny_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pth")
    common = ["--ckpt", checkpoint, "--data", tiny_suite, "--ks", 5, 20, "--num-workers", 0, "--no-progress",
              "--device", "cpu", "--json", tmp_path / "knn.json"]
    expected = run_knn(load_backbone(checkpoint), str(tiny_suite), 32, ks=(5, 20), num_workers=0)

    def scores():
        return {int(k): (v["top1"], v["top5"]) for k, v in json.loads((tmp_path / "knn.json").read_text()).items()}

    status, _ = run_main(knn_main, [*common, "--no-cache", "--cache-dir", tmp_path / "unused"], capsys)
    assert status == 0 and scores() == expected
    assert files_under(tmp_path / "unused") == [] and not (tmp_path / "results").exists()

    status, _ = run_main(knn_main, [*common, "--cache-dir", tmp_path / "cache"], capsys)
    assert status == 0 and scores() == expected
    cached = {path: path.stat().st_mtime_ns for path in files_under(tmp_path / "cache")}
    assert sorted(path.name.split("-")[0] for path in cached) == ["train", "val"]
    assert not (tmp_path / "results").exists()

    status, _ = run_main(knn_main, [*common, "--cache-dir", tmp_path / "cache", "--fp32"], capsys)
    assert status == 0 and scores() == expected
    assert {path: path.stat().st_mtime_ns for path in files_under(tmp_path / "cache")} == cached  # read back

    status, _ = run_main(knn_main, common, capsys)
    assert status == 0 and scores() == expected
    assert len(files_under(tmp_path / "results" / "tiny" / "features")) == 2


def test_knn_command_refuses_a_bad_flag_value_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        knn_main(["--data", "d", "--ckpt", "c.pth", "--key", "momentum"])
    assert "invalid choice: 'momentum' (choose from 'teacher', 'student')" in capsys.readouterr().err
