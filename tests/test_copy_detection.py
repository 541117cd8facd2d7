"""evaluate.copy_detection: exact copies score 100, whitening and distractors as specified, end to end, bad input."""
import json

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from evaluator_trees import (
    files_under,
    pattern_image,
    run_main,
    save_image,
    save_tiny_checkpoint,
    tiny_vit,
    write_copydays_tree,
)

from data.copydays import Copydays
from evaluate.copy_detection import COPY_DETECTION_SPEC, copy_detection_transform, main, run_copy_detection, top_matches
from evaluate.descriptors import fit_pca_whitening
from evaluate.features import FeatureExtractor, ImageList
from evaluate.metrics import copy_detection_block_maps


def extractor_for(tmp_path, cache=True):
    return FeatureExtractor(tiny_vit(), device="cpu", batch_size=8, num_workers=0,
                            cache_dir=tmp_path / "cache" if cache else None, progress=False)


def mirrored(image, index):
    """A strong 'copy' that is not a duplicate: mirrored, with a dark band."""
    image = PIL.ImageOps.mirror(image)
    pixels = np.array(image)
    pixels[: 4 + index] = 0
    return PIL.Image.fromarray(pixels)


def test_top_matches_are_the_best_cosines_first():
    database = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[2.0, 0.1], [0.0, -1.0]])
    assert top_matches(database, queries, top_k=2).tolist() == [[0, 2], [0, 2]]  # ties keep the lower index
    assert top_matches(database, queries, top_k=20).shape == (2, 3)


def test_exact_copies_give_100_map(tmp_path):
    write_copydays_tree(tmp_path / "copydays")
    result = run_copy_detection(extractor_for(tmp_path), tmp_path / "copydays", imsize=32)
    assert result["copydays_strong_mAP"] == 100.0
    assert result["block_maps"] == {"original": 100.0, "strong": 100.0, "jpegqual/50": 100.0, "crops/10": 100.0}
    assert result["database_size"] == 4 and result["whitened"] is False


def test_whitening_and_distractors_follow_the_protocol(tmp_path):
    root = write_copydays_tree(tmp_path / "copydays", strong_copy=mirrored)
    for index in range(12):
        save_image(pattern_image(100 + index), tmp_path / "whitening" / f"w{index:02d}.png")
    # a distractor that is the exact file of original 0's strong copy: it must take rank 0 for that query
    distractor = save_image(PIL.Image.open(root / "strong" / "200001.jpg"), tmp_path / "distractors" / "d0.png")
    save_image(pattern_image(200), tmp_path / "distractors" / "d1.png")
    extractor = extractor_for(tmp_path)
    result = run_copy_detection(extractor, root, imsize=32, distractors=tmp_path / "distractors",
                                whitening=tmp_path / "whitening")
    assert result["database_size"] == 6 and result["whitened"] is True

    # the same numbers by hand: descriptors -> whitening fitted on the whitening set -> top 20 -> block mAPs
    copydays = Copydays(root, tmp_path / "distractors", tmp_path / "whitening")
    plain = FeatureExtractor(tiny_vit(), device="cpu", num_workers=0, progress=False)

    def descriptors(paths):
        return plain(ImageList(paths, copy_detection_transform(32)), COPY_DETECTION_SPEC)[0]

    whitening = fit_pca_whitening(descriptors(copydays.whitening_paths))
    database, queries = whitening.apply(descriptors(copydays.database_paths)), \
        whitening.apply(descriptors(copydays.query_paths))
    retrieved = top_matches(database, queries)
    positives = [p for block in copydays.query_blocks for p in block.positives]
    blocks = [(block.name, len(block.paths)) for block in copydays.query_blocks]
    assert result["block_maps"] == pytest.approx(copy_detection_block_maps(retrieved, positives, blocks))
    strong_query = copydays.query_paths.index(str(root / "strong" / "200001.jpg"))
    assert retrieved[strong_query][0] == copydays.database_paths.index(str(distractor))
    assert result["block_maps"]["strong"] < 100.0

    unwhitened = run_copy_detection(extractor, root, imsize=32)
    assert unwhitened["database_size"] == 4 and not unwhitened["whitened"]
    assert top_matches(descriptors(copydays.original_paths), descriptors(copydays.query_paths)).tolist() != \
        top_matches(whitening.apply(descriptors(copydays.original_paths)),
                    whitening.apply(descriptors(copydays.query_paths))).tolist()


def test_embedded_suite_end_to_end(tmp_path, capsys):
    suite_copydays = pytest.importorskip("data.suite_copydays")
    suite_copydays.write_copydays(tmp_path / "suite", n_originals=3, n_distractors=4, n_whitening=8, progress=False)
    root = tmp_path / "suite" / "copydays"
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pth")
    status, err = run_main(main, ["--ckpt", checkpoint, "--data", root, "--distractors", root / "distractors",
                                  "--whitening", root / "whitening", "--imsize", 48, "--num-workers", 0,
                                  "--cache-dir", tmp_path / "cache", "--json", tmp_path / "out.json"], capsys)
    assert status == 0, err
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["database_size"] == 3 + 4 and result["whitened"]
    assert len(result["block_maps"]) == 20 and result["copydays_strong_mAP"] == result["block_maps"]["strong"]
    assert result["block_maps"]["original"] == 100.0  # an original's query is its own database entry
    assert len(files_under(tmp_path / "cache")) == 3  # database, queries, whitening


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    root = write_copydays_tree(tmp_path / "copydays")
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pth")
    common = ["--ckpt", checkpoint, "--imsize", 32, "--num-workers", 0, "--cache-dir", tmp_path / "cache",
              "--json", tmp_path / "out.json"]
    status, err = run_main(main, ["--data", root, "--whitening", tmp_path / "absent", *common], capsys)
    assert status == 2 and err.count("\n") == 1 and str(tmp_path / "absent") in err
    (root / "crops" / "10" / "200300.jpg").unlink()
    status, err = run_main(main, ["--data", root, *common], capsys)
    assert status == 2 and err.count("\n") == 1 and str(root / "crops" / "10") in err
    (root / "crops" / "10" / "200300.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    status, err = run_main(main, ["--data", root, *common], capsys)
    assert status == 2 and err.count("\n") == 1 and "200300.jpg" in err
    assert not (tmp_path / "out.json").exists()
    assert [path.name.split("-")[1] for path in files_under(tmp_path / "cache")] == ["database"]
