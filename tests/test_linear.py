"""evaluate.linear: the optimisation recipe against its formulas, separable data, both paths end to end, bad input."""
import json
import math

import pytest
import torch
from evaluator_trees import files_under, pattern_image, run_main, save_image, save_tiny_checkpoint, tiny_vit

from common.scaling import scaled_lr
from common.transforms import eval_transform
from data.imagefolder import ImageFolder
from evaluate.features import FeatureExtractor, FeatureSpec
from evaluate.linear import (
    LinearClassifier,
    classifier_accuracies,
    linear_feature_spec,
    main,
    run_linear,
    shuffled_batches,
    train_linear_probe,
)
from pretrain import build_backbone


def separable_features(n_per_class=40, num_classes=4, dim=16, seed=0):
    """Gaussian clusters around well-separated class means."""
    generator = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return means[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator), labels


def test_lr_scaling_and_per_epoch_cosine_follow_the_formula():
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3) and scaled_lr(1e-3, 256) == pytest.approx(1e-3)
    features, labels = separable_features()
    epochs, lr = 7, scaled_lr(1e-3, 32)
    result = train_linear_probe(shuffled_batches(features, labels, 32, torch.Generator().manual_seed(0)),
                                features, labels, 4, epochs=epochs, lr=lr, val_every=3)
    expected = [lr * (1 + math.cos(math.pi * epoch / epochs)) / 2 for epoch in range(epochs)]
    assert [record["lr"] for record in result.history] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert [("top1" in record) for record in result.history] == [False, False, True, False, False, True, True]


def test_classifier_init_is_the_official_one():
    torch.manual_seed(0)
    classifier = LinearClassifier(1536, 1000)
    assert classifier.linear.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(classifier.linear.weight.mean().item()) < 1e-4 and torch.count_nonzero(classifier.linear.bias) == 0


def test_separable_features_reach_100_percent():
    features, labels = separable_features()
    val_features, val_labels = separable_features(n_per_class=10, seed=0)
    result = train_linear_probe(shuffled_batches(features, labels, 16, torch.Generator().manual_seed(0)),
                                val_features, val_labels, 4, epochs=20, lr=0.05)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert result.history[-1]["loss"] < 0.05 < result.history[0]["loss"]
    assert classifier_accuracies(result.classifier, val_features, val_labels) == (100.0, 100.0)


def test_reported_numbers_are_the_best_epoch():
    features, labels = separable_features(seed=1)
    noisy_val = separable_features(n_per_class=10, seed=1)[0] + 3.0 * torch.randn(40, 16)
    result = train_linear_probe(shuffled_batches(features, labels, 8, torch.Generator().manual_seed(0)),
                                noisy_val, torch.arange(4).repeat_interleave(10), 4, epochs=6, lr=0.2)
    best = max(result.history, key=lambda record: record["top1"])
    assert result.top1 == max(record["top1"] for record in result.history)
    assert (result.best_epoch, result.top5) == (best["epoch"], best["top5"])
    assert result.metrics() == {"linear_top1": result.top1, "linear_top5": result.top5}


def test_feature_rule_per_arch():
    assert linear_feature_spec(tiny_vit()) == FeatureSpec("last_blocks", n_last_blocks=2)  # depth 2 < 4
    with torch.device("meta"):  # shapes only: no memory, no init cost
        small, base = build_backbone("vit_small", 16), build_backbone("vit_base", 16)
    assert linear_feature_spec(small) == FeatureSpec("last_blocks", n_last_blocks=4)
    assert linear_feature_spec(small, 1, True) == FeatureSpec("last_blocks", n_last_blocks=1, avgpool_patchtokens=True)
    assert linear_feature_spec(base) == FeatureSpec("last_blocks", n_last_blocks=1, avgpool_patchtokens=True)


def test_both_paths_end_to_end_on_the_embedded_suite(tiny_suite, tmp_path):
    extractor = FeatureExtractor(tiny_vit(), device="cpu", batch_size=32, num_workers=0,
                                 cache_dir=tmp_path / "cache", progress=False)
    cached = run_linear(extractor, tiny_suite, image_size=32, epochs=3, batch_size=32, base_lr=0.05, augment=False)
    assert len(files_under(tmp_path / "cache")) == 2  # train and val features
    faithful = run_linear(extractor, tiny_suite, image_size=32, epochs=2, batch_size=32, base_lr=0.05)
    assert len(files_under(tmp_path / "cache")) == 2  # augmented crops are never cached; val is reused
    # 10 classes x 4 val images: every accuracy is a multiple of 2.5 %
    for result in (cached, faithful):
        assert 0.0 <= result.top1 <= result.top5 <= 100.0
        assert result.top1 == pytest.approx(2.5 * round(result.top1 / 2.5))
        assert result.classifier.linear.in_features == 64
    # the cached path's val features are the manual ones, so its reported top-1 is the classifier's on them
    val_set = ImageFolder(tiny_suite / "val", eval_transform(32))
    val_features, val_labels = extractor(val_set, linear_feature_spec(extractor.model), "val")
    assert classifier_accuracies(cached.classifier, val_features, val_labels)[0] == cached.history[-1]["top1"]


def test_main_on_a_checkpoint_writes_json_and_reuses_the_cache(tiny_suite, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pth")
    argv = ["--ckpt", checkpoint, "--data", tiny_suite, "--epochs", 2, "--cached-features", "--batch-size", 64,
            "--num-workers", 0, "--cache-dir", tmp_path / "cache", "--json", tmp_path / "linear.json",
            "--output", tmp_path / "head.pth"]
    status, _ = run_main(main, argv, capsys)
    assert status == 0
    result = json.loads((tmp_path / "linear.json").read_text())
    assert set(result) >= {"linear_top1", "linear_top5", "history"} and len(result["history"]) == 2
    cache_files = {path: path.stat().st_mtime_ns for path in files_under(tmp_path / "cache")}
    assert len(cache_files) == 2
    assert run_main(main, argv, capsys)[0] == 0
    assert {path: path.stat().st_mtime_ns for path in files_under(tmp_path / "cache")} == cache_files
    assert json.loads((tmp_path / "linear.json").read_text())["linear_top1"] == result["linear_top1"]
    head = torch.load(tmp_path / "head.pth", weights_only=True)["state_dict"]
    assert head["linear.weight"].shape == (10, 64)


def test_bad_input_is_one_line_and_writes_nothing(tiny_suite, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pth")
    common = ["--epochs", 1, "--cached-features", "--num-workers", 0, "--cache-dir", tmp_path / "cache",
              "--json", tmp_path / "out.json"]
    no_val = tmp_path / "no_val"
    save_image(pattern_image(0), no_val / "train" / "a" / "0.png")
    status, err = run_main(main, ["--ckpt", checkpoint, "--data", no_val, *common], capsys)
    assert status == 2 and err.count("\n") == 1 and str(no_val / "val") in err

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00not a checkpoint")
    status, err = run_main(main, ["--ckpt", broken, "--data", tiny_suite, *common], capsys)
    assert status == 2 and err.count("\n") == 1 and str(broken) in err

    corrupt = tmp_path / "corrupt"
    for split in ("train", "val"):
        save_image(pattern_image(1), corrupt / split / "a" / "0.png")
    (corrupt / "val" / "a" / "1.png").write_bytes(b"\x89PNG truncated")
    status, err = run_main(main, ["--ckpt", checkpoint, "--data", corrupt, *common], capsys)
    assert status == 2 and err.count("\n") == 1 and "1.png" in err and "cannot decode" in err
    assert not (tmp_path / "out.json").exists() and files_under(tmp_path / "cache") == []
