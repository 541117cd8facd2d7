"""evaluate.features: feature functions against manual computations, the cache's hits and misses;
evaluate.model_source: every tool's model flags and loader."""
import argparse
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from evaluator_trees import files_under, pattern_image, save_image, save_tiny_checkpoint, tiny_vit

from analysis import report
from common.errors import UserError
from common.transforms import eval_transform
from data.imagefolder import ImageFolder
from evaluate.descriptors import copy_detection_descriptor
from evaluate.features import (
    FeatureExtractor,
    FeatureSpec,
    ImageList,
    extraction_defaults,
    rescale,
    weights_fingerprint,
)
from evaluate.model_source import (
    ModelSource,
    add_extraction_arguments,
    add_model_arguments,
    load_model,
    load_model_source,
    run_name,
)
from pretrain import build_backbone, load_backbone
from pretrain.backbones import describe
from pretrain.checkpoint import atomic_save


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
    whole, cropped = ImageList(paths, eval_transform(32)), ImageList(paths, eval_transform(32), load=crop,
                                                                     variant="crop")
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


# ---------------------------------------------------------------- evaluate.model_source: one loader, one set of flags

# every tool that loads a model by checkpoint: (module, the arguments its parser requires)
EVALUATORS = [("evaluate.knn", ["--data", "d"]), ("evaluate.linear", ["--data", "d"]),
              ("evaluate.retrieval", ["--data", "d"]), ("evaluate.copy_detection", ["--data", "d"]),
              ("evaluate.video_segmentation", ["--davis", "d"]), ("evaluate.attention_masks", ["--voc", "d"]),
              ("evaluate.emergence", [])]
EXTRACTING = EVALUATORS + [("evaluate.eval_all", [])]
MODEL_TOOLS = EXTRACTING + [("analysis.report", [])]
MODEL_FLAGS = ["--ckpt", "c.pth", "--arch", "vit_small", "--patch", "8", "--key", "student", "--random-like", "r.pth",
               "--seed", "3"]
EXTRACTION_FLAGS = ["--device", "cpu", "--batch-size", "5", "--num-workers", "0", "--fp32", "--cache-dir", "cache",
                    "--no-cache", "--no-progress"]


def build_parser(module: str):
    return importlib.import_module(module).build_parser()


def flag_definitions(parser, flags) -> dict:
    """{option: (dest, default, choices, type, nargs, action class)} of ``parser``'s ``flags``."""
    return {option: (action.dest, action.default, action.choices, action.type, action.nargs, type(action))
            for action in parser._actions for option in action.option_strings if option in flags}


@pytest.mark.parametrize("module,required", EXTRACTING, ids=[module for module, _ in EXTRACTING])
def test_every_evaluator_parser_takes_the_common_flags(module, required):
    parser = build_parser(module)
    args = parser.parse_args([*required, *MODEL_FLAGS, *EXTRACTION_FLAGS])
    assert (args.ckpt, args.arch, args.patch, args.key, args.random_like, args.seed) == \
        ("c.pth", "vit_small", 8, "student", "r.pth", 3)
    assert (args.device, args.batch_size, args.num_workers, args.fp32, args.cache_dir, args.no_cache,
            args.no_progress) == ("cpu", 5, 0, True, "cache", True, True)
    defaults = parser.parse_args(required)
    assert (defaults.ckpt, defaults.key, defaults.random_like, defaults.seed, defaults.device, defaults.fp32,
            defaults.cache_dir, defaults.no_cache, defaults.no_progress) == \
        (None, "teacher", None, 0, None, False, None, False, False)
    # one definition of each flag (the batch-size default aside, which is each tool's own)
    reference = argparse.ArgumentParser()
    add_model_arguments(reference)
    add_extraction_arguments(reference)
    flags = [flag for flag in MODEL_FLAGS + EXTRACTION_FLAGS if flag.startswith("--") and flag != "--batch-size"]
    assert flag_definitions(parser, flags) == flag_definitions(reference, flags)
    if module != "evaluate.eval_all":
        assert parser.parse_args([*required, "--json", "out.json"]).json == "out.json"


@pytest.mark.parametrize("module,required", MODEL_TOOLS, ids=[module for module, _ in MODEL_TOOLS])
@pytest.mark.parametrize("flag,value,allowed", [
    ("--key", "momentum", "'teacher', 'student'"),
    ("--arch", "vit_huge", "'vit_tiny', 'vit_small', 'vit_base', 'resnet50'"),
    ("--device", "tpu", "cpu, cuda, cuda:<index>"), ("--patch", "0", "at least 1")])
def test_flag_values_outside_their_choices_fail_at_parse_time(module, required, flag, value, allowed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser(module).parse_args([*required, "--ckpt", "c.pth", flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in error and allowed in error and value in error


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Trained weights: not those of a seed-0 initialisation (the twin's)."""
    return save_tiny_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pth", tiny_vit(7))


def load_through(module: str, argv) -> ModelSource:
    return load_model(build_parser(module).parse_args([str(arg) for arg in argv]))


LOADER_PATHS = ["evaluate.knn", "evaluate.eval_all", "analysis.report"]  # the three former loaders' users


@pytest.mark.parametrize("module", LOADER_PATHS)
def test_a_checkpoint_loads_the_same_model_on_every_path(tiny_checkpoint, module):
    required = dict(MODEL_TOOLS)[module]
    source = load_through(module, [*required, "--ckpt", tiny_checkpoint])
    assert (source.run, source.method, source.random, source.twin, source.key) == ("tiny", "tiny", False, False,
                                                                                    "teacher")
    assert source.train_args["global_crops_size"] == 32 and source.crop_size == 32
    assert source.weights == weights_fingerprint(tiny_vit(7)) == weights_fingerprint(load_backbone(tiny_checkpoint))
    assert source.results_dir("davis") == Path("results/tiny/davis")
    report_subject, warnings = report.load_reported_model(str(tiny_checkpoint))
    assert warnings == [] and report_subject.weights == source.weights and report_subject.run == source.run


@pytest.mark.parametrize("module", LOADER_PATHS)
def test_random_with_an_arch_is_a_seeded_initialisation_on_every_path(module):
    required = dict(MODEL_TOOLS)[module]
    source = load_through(module, [*required, "--ckpt", "random", "--arch", "vit_tiny", "--patch", 16, "--seed", 1])
    torch.manual_seed(1)
    assert source.weights == weights_fingerprint(build_backbone("vit_tiny", 16))
    assert (source.run, source.method, source.random, source.twin, source.train_args) == \
        ("random-vit_tiny-p16", "random init (vit_tiny)", True, False, None)
    alone = load_through(module, [*required, "--arch", "vit_tiny", "--seed", 1])  # --arch alone: random, patch 16
    assert (alone.run, alone.weights) == (source.run, source.weights)
    other_seed = load_through(module, [*required, "--arch", "vit_tiny", "--seed", 2])
    assert other_seed.weights != source.weights


@pytest.mark.parametrize("module", ["evaluate.knn", "evaluate.eval_all"])
def test_the_random_twin_is_the_checkpoints_architecture_with_seeded_weights(tiny_checkpoint, module):
    required = dict(MODEL_TOOLS)[module]
    twin = load_through(module, [*required, "--random-like", tiny_checkpoint])
    trained = load_model_source(tiny_checkpoint)
    assert describe(twin.model) == describe(trained.model) and twin.weights != trained.weights
    torch.manual_seed(0)
    assert twin.weights == weights_fingerprint(build_backbone("vit", 8, embed_dim=32, depth=2, num_heads=2,
                                                              img_size=32))
    assert (twin.run, twin.method, twin.random, twin.twin) == ("tiny", "random init (vit)", True, True)
    assert twin.train_args == trained.train_args and twin.crop_size == 32
    assert twin.results_dir("davis") == Path("results/tiny/davis-random-init")
    assert load_model_source(random_like=tiny_checkpoint, seed=0).weights == twin.weights
    assert load_model_source(random_like=tiny_checkpoint, seed=1).weights != twin.weights


def test_no_model_named_is_one_clear_error():
    for module, required in EXTRACTING:
        with pytest.raises(UserError, match="no model given: pass --ckpt"):
            load_through(module, required)


def test_the_report_takes_the_model_flags_but_refuses_a_twin(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="shows the random twin beside its model already: pass --ckpt"):
        report.main(["--random-like", str(tiny_checkpoint), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="no model given"):
        report.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
