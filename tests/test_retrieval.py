"""evaluate.retrieval: ranks against brute force, mAP on a hand case, thumbnails, multiscale, end to end, bad input."""
import json
import math
import os
import pickle
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_data_dir
from evaluator_trees import files_under, run_main, save_tiny_checkpoint, tiny_vit, write_revisitop_tree

from data.revisitop import QueryGroundTruth, RevisitopDataset
from evaluate.features import FeatureExtractor, ImageList
from evaluate.metrics import retrieval_map
from evaluate.retrieval import (
    MULTISCALE,
    Thumbnail,
    dataset_features,
    find_datasets,
    main,
    map_scores,
    rank_database,
    retrieval_spec,
    retrieval_transform,
    run_retrieval,
)


def test_ranks_equal_brute_force():
    generator = torch.Generator().manual_seed(0)
    database, queries = torch.randn(50, 8, generator=generator), torch.randn(7, 8, generator=generator)
    ranks = rank_database(database * torch.rand(50, 1, generator=generator) * 5, queries)  # norms do not matter
    assert ranks.shape == (50, 7)
    for query in range(7):
        cosines = [float(database[i] @ queries[query]) / float(database[i].norm() * queries[query].norm())
                   for i in range(50)]
        assert ranks[:, query].tolist() == sorted(range(50), key=lambda i: -cosines[i])


def test_map_on_a_hand_case():
    # database directions at angles 60, 150, 0 (nearest) and 100 degrees from the query: ranking [2, 0, 3, 1]
    angles = np.deg2rad([60, 150, 0, 100])
    database = torch.tensor(np.stack([np.cos(angles), np.sin(angles)], 1))
    ranks = rank_database(database, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert ranks[:, 0].tolist() == [2, 0, 3, 1]
    query = QueryGroundTruth(bbx=(0, 0, 1, 1), easy=np.array([0]), hard=np.array([1]), junk=np.array([3]))
    scores = map_scores(ranks, [query], "hand")
    # medium: positives {0, 1}, junk 3 removed -> ranking [2, 0, 1]: positives at ranks 1 and 2
    #   AP = ((0 + 1/2) / 2 + (1/2 + 2/3) / 2) / 2 = 5/12
    # hard: positives {1}, ignored {3, 0} -> [2, 1]: AP = (0 + 1/2) / 2 = 1/4; easy likewise 1/4
    assert scores == pytest.approx({"hand_mAP_easy": 25.0, "hand_mAP_medium": 500 / 12, "hand_mAP_hard": 25.0})
    gnd = [{"easy": [0], "hard": [1], "junk": [3]}]
    assert scores["hand_mAP_medium"] == pytest.approx(retrieval_map(ranks, gnd, "medium"))
    no_easy = QueryGroundTruth(bbx=(0, 0, 1, 1), easy=np.array([], dtype=np.int64), hard=np.array([1]),
                               junk=np.array([], dtype=np.int64))
    assert set(map_scores(ranks, [no_easy], "hand")) == {"hand_mAP_medium", "hand_mAP_hard"}


def test_thumbnail_keeps_the_aspect_and_never_upsamples():
    assert Thumbnail(64)(PIL.Image.new("RGB", (100, 50))).size == (64, 32)
    assert Thumbnail(64)(PIL.Image.new("RGB", (30, 90))).size == (21, 64)
    assert Thumbnail(64)(PIL.Image.new("RGB", (20, 10))).size == (20, 10)


def test_multiscale_equals_the_manual_average():
    model, image = tiny_vit(), torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        manual = sum(model(F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False))
                     for s in (1, 1 / math.sqrt(2), 0.5)) / 3
        torch.testing.assert_close(retrieval_spec(multiscale=True)(model, image), manual)
        torch.testing.assert_close(retrieval_spec(multiscale=False)(model, image), model(image))
    assert MULTISCALE == (1.0, 1 / math.sqrt(2), 0.5)


def extractor_for(tmp_path):
    return FeatureExtractor(tiny_vit(), device="cpu", num_workers=0, cache_dir=tmp_path / "cache", progress=False)


def test_exact_duplicate_queries_on_a_tiny_tree(tmp_path):
    write_revisitop_tree(tmp_path / "data")
    extractor = extractor_for(tmp_path)
    scores = run_retrieval(extractor, tmp_path / "data", "tiny", imsize=40)
    assert scores["tiny_mAP_easy"] == 100.0  # the query's file is its easy positive's
    assert set(scores) == {"tiny_mAP_easy", "tiny_mAP_medium", "tiny_mAP_hard"}
    assert len(files_under(tmp_path / "cache")) == 2  # database and queries
    cropped = run_retrieval(extractor, tmp_path / "data", "tiny", imsize=40, crop_queries=True)
    assert len(files_under(tmp_path / "cache")) == 3  # cropped queries are other features
    assert set(cropped) == set(scores)
    whole = dataset_features(extractor, RevisitopDataset(tmp_path / "data", "tiny"), 40, False)
    crops = dataset_features(extractor, RevisitopDataset(tmp_path / "data", "tiny", crop_queries=True), 40, False)
    assert len(files_under(tmp_path / "cache")) == 3  # all read back from the cache
    assert torch.equal(whole[0], crops[0]) and not torch.allclose(whole[1], crops[1])
    assert find_datasets(tmp_path / "data") == ["tiny"]


def test_embedded_suite_end_to_end(tmp_path):
    suite_retrieval = pytest.importorskip("data.suite_retrieval")
    suite_retrieval.write_retrieval(tmp_path / "suite", n_landmarks=2, n_views_per_landmark=4,
                                    n_queries_per_landmark=1, n_distractors=3, progress=False)
    root = tmp_path / "suite" / "retrieval"
    dataset = find_datasets(root)[0]
    extractor = extractor_for(tmp_path)
    scores = run_retrieval(extractor, root, dataset, imsize=64, multiscale=True)
    assert {f"{dataset}_mAP_medium", f"{dataset}_mAP_hard"} <= set(scores)
    # the same number from the cached features, ranked and scored by hand
    gnd = pickle.loads((root / dataset / f"gnd_{dataset}.pkl").read_bytes())
    database = extractor(_images(root / dataset, gnd["imlist"], 64), retrieval_spec(True), f"{dataset}-database")[0]
    queries = extractor(_images(root / dataset, gnd["qimlist"], 64), retrieval_spec(True), f"{dataset}-queries")[0]
    ranks = rank_database(database, queries)
    assert scores[f"{dataset}_mAP_medium"] == pytest.approx(retrieval_map(ranks, gnd["gnd"], "medium"))


def _images(folder, names, imsize):
    return ImageList([folder / "jpg" / f"{name}.jpg" for name in names], retrieval_transform(imsize))


def gnd_subset(gnd: dict, n_queries: int, n_others: int) -> dict:
    """The first queries of a gnd dict and a smaller database: their labelled images plus a few others."""
    queries = gnd["gnd"][:n_queries]
    labelled = sorted({i for query in queries for key in ("easy", "hard", "junk") for i in query[key]})
    others = [i for i in range(len(gnd["imlist"])) if i not in labelled][:n_others]
    kept = sorted(labelled + others)
    new_index = {old: new for new, old in enumerate(kept)}
    return {"imlist": [gnd["imlist"][i] for i in kept], "qimlist": gnd["qimlist"][:n_queries],
            "gnd": [{"bbx": query["bbx"],
                     **{key: [new_index[i] for i in query[key]] for key in ("easy", "hard", "junk")}}
                    for query in queries]}


@pytest.mark.parametrize("dataset", ["roxford5k", "rparis6k"])
def test_real_revisitop_sample(tmp_path, capsys, dataset):
    shared = shared_data_dir()
    if shared is None or not (shared / "revisitop" / dataset).is_dir():
        pytest.skip("real revisitop sample (../shared/data/revisitop) not present")
    # real images, fewer of them (decoding 1024-px JPEGs dominates); the sample's queries come
    # pre-cropped in query_crops/: lay them beside the database images
    source, images = shared / "revisitop" / dataset, tmp_path / dataset / "jpg"
    images.mkdir(parents=True)
    gnd = gnd_subset(pickle.loads((shared / "revisitop" / f"gnd_{dataset}_mini.pkl").read_bytes()), 2, 6)
    for name in gnd["imlist"]:
        os.symlink(source / "jpg" / f"{name}.jpg", images / f"{name}.jpg")
    for name in gnd["qimlist"]:
        os.symlink(source / "query_crops" / f"{name}.jpg", images / f"{name}.jpg")
    (tmp_path / f"gnd_{dataset}_mini.pkl").write_bytes(pickle.dumps(gnd, protocol=3))
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pth")
    status, err = run_main(main, ["--ckpt", checkpoint, "--data", tmp_path, "--datasets", dataset,
                                  "--gnd", tmp_path / f"gnd_{dataset}_mini.pkl",
                                  "--multiscale", "--imsize", 64, "--num-workers", 0, "--cache-dir", tmp_path / "cache",
                                  "--json", tmp_path / "out.json"], capsys)
    assert status == 0, err
    scores = json.loads((tmp_path / "out.json").read_text())
    assert {f"{dataset}_mAP_medium", f"{dataset}_mAP_hard"} <= set(scores)
    assert all(0.0 < value <= 100.0 for value in scores.values())


def test_main_and_bad_input(tmp_path, capsys):
    gnd = write_revisitop_tree(tmp_path / "data")
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint.pth")
    common = ["--ckpt", checkpoint, "--imsize", 40, "--num-workers", 0, "--cache-dir", tmp_path / "cache",
              "--json", tmp_path / "out.json"]
    status, _ = run_main(main, ["--data", tmp_path / "data", *common], capsys)
    assert status == 0 and json.loads((tmp_path / "out.json").read_text())["tiny_mAP_easy"] == 100.0
    (tmp_path / "out.json").unlink()
    shutil.rmtree(tmp_path / "cache")

    gnd_path = tmp_path / "data" / "tiny" / "gnd_tiny.pkl"
    gnd_path.write_bytes(pickle.dumps({**gnd, "gnd": gnd["gnd"][:1]}, protocol=3))  # one entry for 2 queries
    status, err = run_main(main, ["--data", tmp_path / "data", *common], capsys)
    assert status == 2 and err.count("\n") == 1 and str(gnd_path) in err and "malformed" in err

    gnd_path.write_bytes(pickle.dumps(gnd, protocol=3))
    (tmp_path / "data" / "tiny" / "jpg" / "db3.jpg").unlink()
    status, err = run_main(main, ["--data", tmp_path / "data", *common], capsys)
    assert status == 2 and err.count("\n") == 1 and "db3.jpg" in err and "missing" in err

    status, err = run_main(main, ["--data", tmp_path / "nowhere", *common], capsys)
    assert status == 2 and err.count("\n") == 1 and "nowhere" in err
    assert not (tmp_path / "out.json").exists() and files_under(tmp_path / "cache") == []
