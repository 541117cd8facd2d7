"""evaluate.features: feature functions against manual computations, the cache's hits and misses."""
import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from data.imagefolder import ImageFolder
from evaluate.descriptors import copy_detection_descriptor
from evaluate.features import (FeatureExtractor, FeatureSpec, ImageList, extraction_defaults, rescale, run_name,
                               weights_fingerprint)
from common.transforms import eval_transform
from pretrain.checkpoint import atomic_save

from evaluator_trees import files_under, pattern_image, save_image, tiny_vit


@pytest.fixture
def image_folder(tmp_path):
    for index in range(6):
        save_image(pattern_image(index), tmp_path / "data" / f"class{index % 2}" / f"{index}.png")
    return ImageFolder(tmp_path / "data", eval_transform(32))


class PatchEmbedCalls:
    """Counts forward passes (every feature function runs the patch embedding once per batch and scale)."""

    def __init__(self, model):
        self.count = 0
        model.patch_embed.register_forward_hook(lambda *args: setattr(self, "count", self.count + 1))


def test_cls_and_last_blocks_equal_manual_computations():
    model, images = tiny_vit(), torch.randn(3, 3, 32, 40)
    with torch.no_grad():
        layers = model.get_intermediate_layers(images, 2)
        torch.testing.assert_close(FeatureSpec("cls")(model, images), model(images))
        concatenated = FeatureSpec("last_blocks", n_last_blocks=2)(model, images)
        torch.testing.assert_close(concatenated, torch.cat([layers[0][:, 0], layers[1][:, 0]], dim=1))
        assert concatenated.shape == (3, 64)
        # the last block's [CLS] is the model's output
        torch.testing.assert_close(concatenated[:, 32:], model(images))
        pooled = FeatureSpec("last_blocks", n_last_blocks=1, avgpool_patchtokens=True)(model, images)
        assert pooled.shape == (3, 64)  # interleaved: [cls_0, avg_0, cls_1, avg_1, ...]
        torch.testing.assert_close(pooled[:, 0::2], layers[1][:, 0])
        torch.testing.assert_close(pooled[:, 1::2], layers[1][:, 1:].mean(dim=1))
        descriptor = FeatureSpec("copy_detection")(model, images)
        torch.testing.assert_close(descriptor, copy_detection_descriptor(layers[1], p=4.0))
    with pytest.raises(UserError, match="n_last_blocks 2"):
        FeatureSpec("last_blocks", n_last_blocks=2, avgpool_patchtokens=True)


def test_extractor_matches_one_batch_and_keeps_dataset_order(image_folder):
    model = tiny_vit()
    extractor = FeatureExtractor(model, device="cpu", batch_size=4, num_workers=0, progress=False)
    spec = FeatureSpec("last_blocks", n_last_blocks=2)
    features, labels = extractor(image_folder, spec, "train")
    images = torch.stack([image_folder[i][0] for i in range(len(image_folder))])
    with torch.no_grad():
        expected = spec(model, images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == image_folder.targets and features.dtype == torch.float32
    torch.testing.assert_close(extractor.batch(images, spec), expected, rtol=1e-5, atol=1e-5)
    assert extractor.autocast_dtype is None  # fp32 on the CPU


def test_cache_hit_is_identical_and_every_key_change_recomputes(image_folder, tmp_path):
    model = tiny_vit()
    calls = PatchEmbedCalls(model)
    cache = tmp_path / "cache"
    extractor = FeatureExtractor(model, device="cpu", batch_size=4, num_workers=0, cache_dir=cache, progress=False)
    first, labels = extractor(image_folder, FeatureSpec(), "train")
    assert calls.count == 2 and len(files_under(cache)) == 1
    again, labels_again = extractor(image_folder, FeatureSpec(), "train")
    assert calls.count == 2  # read from the cache
    assert torch.equal(first, again) and torch.equal(labels, labels_again)

    extractor(image_folder, FeatureSpec("last_blocks", n_last_blocks=2), "train")  # another feature
    assert calls.count == 4
    extractor(image_folder, FeatureSpec(), "val")  # another split name
    assert calls.count == 6
    image_folder.transform = eval_transform(24)  # another transform
    extractor(image_folder, FeatureSpec(), "train")
    assert calls.count == 8 and len(files_under(cache)) == 4
    image_folder.transform = eval_transform(32)

    with torch.no_grad():
        model.cls_token.add_(1.0)  # other weights (a retrained checkpoint at the same path)
    fresh = FeatureExtractor(model, device="cpu", batch_size=4, num_workers=0, cache_dir=cache, progress=False)
    changed, _ = fresh(image_folder, FeatureSpec(), "train")
    assert calls.count == 10 and not torch.allclose(changed, first)


def test_a_stale_or_corrupt_cache_file_is_recomputed(image_folder, tmp_path):
    model = tiny_vit()
    calls = PatchEmbedCalls(model)
    extractor = FeatureExtractor(model, device="cpu", batch_size=8, num_workers=0, cache_dir=tmp_path / "cache",
                                 progress=False)
    features, _ = extractor(image_folder, FeatureSpec(), "train")
    path, = files_under(tmp_path / "cache")
    key = extractor.cache_key(image_folder, FeatureSpec(), "train")
    atomic_save({"key": {**key, "samples": "other"}, "features": torch.zeros_like(features),
                 "labels": torch.zeros(len(features))}, path)
    recomputed, _ = extractor(image_folder, FeatureSpec(), "train")
    assert calls.count == 2 and torch.equal(recomputed, features)
    path.write_bytes(b"not a torch file")
    recomputed, _ = extractor(image_folder, FeatureSpec(), "train")
    assert calls.count == 3 and torch.equal(recomputed, features)
    assert torch.equal(extractor(image_folder, FeatureSpec(), "train")[0], features) and calls.count == 3


def test_refresh_recomputes_each_entry_once(image_folder, tmp_path):
    model = tiny_vit()
    calls = PatchEmbedCalls(model)
    options = dict(device="cpu", batch_size=8, num_workers=0, cache_dir=tmp_path / "cache", progress=False)
    features, _ = FeatureExtractor(model, **options)(image_folder, FeatureSpec(), "train")
    refreshing = FeatureExtractor(model, refresh=True, **options)
    assert torch.equal(refreshing(image_folder, FeatureSpec(), "train")[0], features) and calls.count == 2
    assert torch.equal(refreshing(image_folder, FeatureSpec(), "train")[0], features) and calls.count == 2


def test_image_list_loader_and_its_cache_identity(tmp_path):
    paths = [save_image(pattern_image(index), tmp_path / f"{index}.png") for index in range(3)]
    crop = lambda index: pattern_image(index).crop((0, 0, 16, 16))
    whole, cropped = ImageList(paths, eval_transform(32)), ImageList(paths, eval_transform(32), load=crop, variant="crop")
    assert whole[1][1] == 1 and whole[1][0].shape == (3, 32, 32)
    extractor = FeatureExtractor(tiny_vit(), device="cpu", num_workers=0, cache_dir=tmp_path / "cache", progress=False)
    assert extractor.cache_key(whole, FeatureSpec(), "q") != extractor.cache_key(cropped, FeatureSpec(), "q")
    assert not torch.allclose(extractor(whole, FeatureSpec(), "q")[0], extractor(cropped, FeatureSpec(), "q")[0])


def test_fingerprint_follows_the_weights_and_run_names():
    assert weights_fingerprint(tiny_vit(0)) == weights_fingerprint(tiny_vit(0))
    assert weights_fingerprint(tiny_vit(0)) != weights_fingerprint(tiny_vit(1))
    batch_norm = torch.nn.BatchNorm1d(3)  # holds a 0-d buffer (num_batches_tracked)
    before = weights_fingerprint(batch_norm)
    batch_norm.num_batches_tracked += 1
    assert weights_fingerprint(batch_norm) != before
    assert run_name("runs/demo/checkpoint.pth") == "demo"
    assert run_name("runs/demo/checkpoint0020.pth") == "demo"
    assert run_name("/w/dino_vitbase16_pretrain.pth") == "dino_vitbase16_pretrain"
    assert run_name("random", "vit_small", 16) == "random-vit_small-p16"


def test_multiscale_feature_is_the_mean_over_scales():
    model, images = tiny_vit(), torch.randn(2, 3, 48, 64)
    spec = FeatureSpec("cls", scales=(1.0, 0.5))
    with torch.no_grad():
        expected = (model(images) + model(F.interpolate(images, size=(24, 32), mode="bilinear"))) / 2
        torch.testing.assert_close(spec(model, images), expected)


def test_rescale_keeps_at_least_one_patch_per_side():
    panorama = torch.randn(1, 3, 22, 224)  # a 1024 x 103 image after thumbnail(224)
    torch.testing.assert_close(rescale(panorama, 0.5, 16), F.interpolate(panorama, size=(16, 112), mode="bilinear"))
    torch.testing.assert_close(rescale(panorama, 0.5, 8), F.interpolate(panorama, scale_factor=0.5, mode="bilinear"))
    assert rescale(panorama, 1.0, 16) is panorama
    assert rescale(torch.randn(1, 3, 5, 40), 1.0, 8).shape[-2:] == (8, 40)
    model = tiny_vit()
    with torch.no_grad():
        assert FeatureSpec("cls", scales=(1.0, 0.5))(model, torch.randn(1, 3, 9, 80)).shape == (1, 32)


def test_extraction_defaults_follow_the_device(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert extraction_defaults(torch.device("cuda")) == (256, 8)
    assert extraction_defaults(torch.device("cpu")) == (64, 2)
    extractor = FeatureExtractor(tiny_vit(), "cpu")
    assert (extractor.batch_size, extractor.num_workers) == (64, 2)
    extractor = FeatureExtractor(tiny_vit(), "cpu", batch_size=5, num_workers=0)
    assert (extractor.batch_size, extractor.num_workers) == (5, 0)
