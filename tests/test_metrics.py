"""evaluate.metrics against hand-computed cases and the official DAVIS scores of real predictions."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError, run_cli
from evaluate.metrics import (
    attention_mass_masks,
    best_head_jaccard,
    boundary_f_measure,
    boundary_tolerance,
    copy_detection_ap,
    copy_detection_block_maps,
    davis_j_and_f,
    main,
    mask_boundary,
    mean_jaccard,
    patch_masks_to_pixels,
    ranking_from_similarity,
    read_sequence,
    recall_and_decay,
    region_similarity,
    retrieval_map,
    retrieval_scores,
    score_sequence,
)
from tests.conftest import shared_data_dir

# ------------------------------------------------------------------ retrieval

# 8 database images, 3 queries. Columns of RANKS = database indices, best first.
GND = [
    {"easy": [0], "hard": [3], "junk": [1]},
    {"easy": [], "hard": [], "junk": [2]},       # no positive under any protocol: excluded
    {"easy": [5, 6], "hard": [], "junk": []},    # no hard positive: excluded from 'hard'
]
RANKS = np.array([[0, 1, 2, 3, 4, 5, 6, 7],
                  [2, 0, 1, 3, 4, 5, 6, 7],
                  [7, 5, 6, 0, 1, 2, 3, 4]]).T


def test_retrieval_medium_with_junk_by_hand():
    # query 0, medium: positives {0, 3}, junk {1}. 0 is at rank 0; 3 is at rank 3 with one junk
    # before it -> rank 2. AP = [(1 + 1)/2 + (1/2 + 2/3)/2] / 2 = (1 + 7/12) / 2 = 19/24.
    # query 2, medium: positives {5, 6} at ranks 1, 2 (no junk).
    # AP = [(0/1 + 1/2)/2 + (1/2 + 2/3)/2] / 2 = (1/4 + 7/12) / 2 = 5/12.
    # query 1 has no positive and is left out: mAP = (19/24 + 5/12) / 2 = 29/48.
    scores = retrieval_scores(RANKS, GND, "medium")
    assert scores.map == pytest.approx(100 * 29 / 48)
    np.testing.assert_allclose(scores.ap_per_query, [19 / 24, np.nan, 5 / 12])
    # mP@k, k' = min(k, last positive's 1-based rank): query 0 ranks {1, 3}: P@1 = 1, P@5 = P@10 = 2/3;
    # query 2 ranks {2, 3}: P@1 = 0/1, P@5 = P@10 = 2/3.
    assert scores.precision_at[1] == pytest.approx(50.0)
    assert scores.precision_at[5] == pytest.approx(100 * 2 / 3)
    assert scores.precision_at[10] == pytest.approx(100 * 2 / 3)


def test_retrieval_hard_and_easy_differ_from_medium_on_the_same_ranking():
    # hard, query 0: positive {3}, ignored {1, 0} -> both are before it -> rank 1: AP = (0/1 + 1/2)/2 = 1/4.
    # queries 1 and 2 have no hard positive: mAP = 25.
    assert retrieval_map(RANKS, GND, "hard") == pytest.approx(25.0)
    # easy, query 0: positive {0} at rank 0 -> AP 1; query 2 as in medium, 5/12: mAP = (1 + 5/12)/2 = 17/24.
    assert retrieval_map(RANKS, GND, "easy") == pytest.approx(100 * 17 / 24)
    assert retrieval_map(RANKS, GND, "medium") == pytest.approx(100 * 29 / 48)


def test_retrieval_accepts_ground_truth_objects():
    # data.revisitop gives one object per query with easy/hard/junk arrays instead of a dict
    objects = [SimpleNamespace(**{key: np.array(entry[key]) for key in entry}) for entry in GND]
    assert retrieval_map(RANKS, objects, "medium") == pytest.approx(100 * 29 / 48)


def test_retrieval_ties_break_towards_lower_database_index():
    # query 2's similarities tie between database images 5 and 7: the stable ranking puts 5 first.
    similarity = np.zeros((8, 1))
    similarity[[5, 7], 0], similarity[6, 0] = 0.9, 0.5
    ranking = ranking_from_similarity(similarity)
    assert ranking[:3, 0].tolist() == [5, 7, 6]
    # positives {5, 6} at ranks 0 and 2: AP = [1 + (1/2 + 2/3)/2] / 2 = 19/24.
    assert retrieval_map(ranking, [GND[2]], "medium") == pytest.approx(100 * 19 / 24)


def test_retrieval_item_listed_as_positive_and_junk_follows_revisitop():
    # revisitop counts such an item as a positive at its own position and as junk before later
    # positives: positives {0, 2}, junk {0}, ranking 0, 1, 2 -> ranks 0 and 2 - 1 = 1 -> AP = 1.
    ranking = np.arange(4)[:, None]
    assert retrieval_map(ranking, [{"easy": [0, 2], "hard": [], "junk": [0]}], "medium") == pytest.approx(100.0)


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="n_queries"):
        retrieval_map(RANKS[:, :2], GND, "medium")
    with pytest.raises(ValueError, match="protocol"):
        retrieval_map(RANKS, GND, "medium-hard")
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_map(RANKS[:, 1:2], GND[1:2], "medium")


# ------------------------------------------------------------- copy detection

def test_copy_detection_ap_counts_positives_beyond_k_as_missed():
    retrieved = [2, 7, 5, 1, 9, 3]
    # positives {2, 5, 9}; top 4 holds 2 (rank 0) and 5 (rank 2), 9 (rank 4) is missed:
    # AP = [(1 + 1)/2 + (1/2 + 2/3)/2] / 3 = (1 + 7/12) / 3 = 19/36.
    assert copy_detection_ap(retrieved, {2, 5, 9}, top_k=4) == pytest.approx(19 / 36)
    # with K = 5, 9 adds (2/4 + 3/5)/2 = 11/20: AP = (19/12 + 11/20) / 3 = 32/45.
    assert copy_detection_ap(retrieved, {2, 5, 9}, top_k=5) == pytest.approx(32 / 45)


def test_copy_detection_block_maps():
    retrieved = np.array([[2, 7, 5, 1, 9], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [9, 8, 7, 6, 5]])
    positives = [{2, 5, 9}, {0}, {0}, {1}]
    # block "strong": query 0 -> 19/36 (K = 4). block "crops": AP 1 (rank 0), 0 (0 is at rank 4 >= K),
    # 0 (1 is not retrieved) -> mean 1/3.
    maps = copy_detection_block_maps(retrieved, positives, [("strong", 1), ("crops", 3)], top_k=4)
    assert maps == pytest.approx({"strong": 100 * 19 / 36, "crops": 100 / 3})
    with pytest.raises(ValueError, match="block sizes"):
        copy_detection_block_maps(retrieved, positives, [("strong", 2)])


# ---------------------------------------------------------------- DAVIS J & F

def test_mask_boundary_of_a_square_by_hand():
    square = np.zeros((4, 4), bool)
    square[1:3, 1:3] = True
    # a pixel is on the boundary when it differs from its east, south or south-east neighbour;
    # the boundary sits half a pixel towards the origin, the last row/column use one neighbour.
    expected = np.array([[1, 1, 1, 0],
                         [1, 0, 1, 0],
                         [1, 1, 1, 0],
                         [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask_boundary(square), expected)
    # a mask filling the image has no boundary; the bottom-right pixel itself is never one
    assert not mask_boundary(np.ones((3, 3), bool)).any()
    corner = np.zeros((3, 3), bool)
    corner[2, 2] = True
    np.testing.assert_array_equal(mask_boundary(corner), [[0, 0, 0], [0, 1, 1], [0, 1, 0]])


def test_j_and_f_of_identical_disjoint_and_empty_masks():
    first, second = np.zeros((2, 100, 100), bool)
    first[10:30, 10:30], second[60:80, 60:80] = True, True
    assert region_similarity(first, first) == 1.0 and boundary_f_measure(first, first) == 1.0
    assert region_similarity(first, second) == 0.0 and boundary_f_measure(first, second) == 0.0
    empty = np.zeros_like(first)
    assert region_similarity(empty, empty) == 1.0 and boundary_f_measure(empty, empty) == 1.0
    assert region_similarity(first, empty) == 0.0 and boundary_f_measure(first, empty) == 0.0


def test_j_of_a_shifted_square():
    gt, pred = np.zeros((2, 100, 100), bool)
    gt[10:30, 10:30], pred[10:30, 15:35] = True, True
    # overlap 20 x 15 = 300, union 400 + 400 - 300 = 500 -> J = 0.6
    assert region_similarity(gt, pred) == pytest.approx(0.6)


def test_f_with_a_shift_inside_and_outside_the_tolerance():
    # 100 x 100: diagonal 141.4 px -> tolerance ceil(0.008 * 141.4) = 2 px (8 px at 854 x 480).
    assert boundary_tolerance((100, 100)) == 2 and boundary_tolerance((480, 854)) == 8
    gt = np.zeros((100, 100), bool)
    gt[:, :50] = True                      # boundary: column 49
    inside, outside = gt.copy(), gt.copy()
    inside[:, :52] = True                  # boundary moved 2 px: every pixel matched -> F = 1
    outside[:, :53] = True                 # moved 3 px: nothing within the disk -> F = 0
    assert boundary_f_measure(gt, inside) == 1.0
    assert boundary_f_measure(gt, outside) == 0.0
    assert region_similarity(gt, outside) == pytest.approx(50 / 53)


def test_f_with_half_of_the_boundary_matched():
    gt = np.zeros((100, 100), bool)
    gt[:, :50] = True                      # GT boundary: column 49, 100 px
    pred = gt.copy()
    pred[50:, :60] = True                  # lower half pushed 10 px right
    # pred boundary: col 49 rows 0-49 (50 px) + row 49 cols 50-59 (10 px) + col 59 rows 50-99 (50 px) = 110.
    # within 2 px of GT col 49: col 49 rows 0-49 and row 49 cols 50-51 -> 52 (precision 52/110);
    # GT pixels within 2 px of pred: rows 0-49 plus rows 50, 51 (near pixel (49, 49)) -> 52 (recall 52/100).
    # F = 2PR / (P + R) = 2 * 52 / (110 + 100) = 104/210.
    assert boundary_f_measure(gt, pred) == pytest.approx(104 / 210)
    # J: |gt| = 5000, |pred| = 2500 + 3000 = 5500, gt inside pred -> 5000/5500
    assert region_similarity(gt, pred) == pytest.approx(10 / 11)


def test_recall_and_decay():
    values = np.array([1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    # recall: 4 of 8 above 0.5. quarters split at round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7] (+1e-10
    # makes 2.75 and 4.5 round up), each [e_i, e_(i+1)] inclusive: first = values[0:3] (mean 14/15),
    # last = values[5:8] (mean 1/15): decay = 13/15.
    recall, decay = recall_and_decay(values)
    assert recall == pytest.approx(0.5)
    assert decay == pytest.approx(13 / 15)


def write_index_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, np.uint8), mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    image.save(path)


@pytest.fixture
def tiny_davis(tmp_path):
    """Two sequences: 'one' (4 frames, 1 object), 'two' (3 frames, 2 objects, a void band)."""
    root, pred = tmp_path / "davis", tmp_path / "pred"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("one\ntwo\n")
    frame = np.zeros((40, 60), np.uint8)
    frame[10:20, 10:30] = 1
    for t in range(4):
        write_index_png(root / "Annotations" / "480p" / "one" / f"{t:05d}.png", frame)
        # frame 2 is missed entirely; frame 3 (the last, not scored) is wrong too
        write_index_png(pred / "one" / f"{t:05d}.png", frame if t in (0, 1) else np.zeros_like(frame))
    two = np.zeros((40, 60), np.uint8)
    two[5:15, 5:15], two[25:35, 30:50] = 1, 2
    two_gt = two.copy()
    two_gt[15, 5:15] = 255                 # void: background for the semi-supervised task
    two_pred = two.copy()
    two_pred[15, 5:15] = 1                 # object 1 predicted over the void band
    for t in range(3):
        write_index_png(root / "Annotations" / "480p" / "two" / f"{t:05d}.png", two_gt)
        write_index_png(pred / "two" / f"{t:05d}.png", two_pred)
    return root, pred


def test_davis_scores_objects_over_inner_frames(tiny_davis):
    root, pred = tiny_davis
    scores = davis_j_and_f(root, pred)
    # 'one': frames 1 and 2 scored (not 0 and 3): J = F = (1 + 0) / 2.
    # 'two': frame 1 scored. Object 1: the 10 void pixels count as background, so predicting them
    # costs J = 100 / 110; its bottom edge moves 1 px, within the 1 px tolerance of a 60 x 40 image
    # (ceil(0.008 * 72.1)), so F = 1. Object 2 is exact.
    per_object = scores["per_object"]
    assert per_object["one_1"] == {"J": 50.0, "F": 50.0}
    assert per_object["two_1"]["J"] == pytest.approx(100 * 100 / 110) and per_object["two_1"]["F"] == 100.0
    assert per_object["two_2"] == {"J": 100.0, "F": 100.0}
    expected_j, expected_f = (50 + 100 * 100 / 110 + 100) / 3, (50 + 100 + 100) / 3
    assert scores["J"] == pytest.approx(expected_j) and scores["F"] == pytest.approx(expected_f)
    assert scores["J&F"] == pytest.approx((expected_j + expected_f) / 2)


def test_davis_scores_a_subset_of_the_split(tiny_davis):
    root, pred = tiny_davis
    scores = davis_j_and_f(root, pred, sequences=["two"])
    assert set(scores["per_object"]) == {"two_1", "two_2"}
    assert scores["J"] == pytest.approx((100 * 100 / 110 + 100) / 2) and scores["F"] == 100.0
    with pytest.raises(UserError, match="sequence\\(s\\) three not in .*val.txt"):
        davis_j_and_f(root, pred, sequences=["two", "three"])


def test_davis_errors_name_the_problem(tiny_davis):
    root, pred = tiny_davis
    (pred / "two" / "00001.png").unlink()
    with pytest.raises(UserError, match=r"missing prediction .*two.*00001\.png"):
        davis_j_and_f(root, pred)
    write_index_png(pred / "two" / "00001.png", np.zeros((40, 61)))
    with pytest.raises(UserError, match="61x40 but the annotation is 60x40"):
        davis_j_and_f(root, pred)
    write_index_png(pred / "two" / "00001.png", np.full((40, 60), 3))
    with pytest.raises(UserError, match="object id 3 but 'two' has 2"):
        davis_j_and_f(root, pred)
    with pytest.raises(UserError, match="ImageSets"):
        davis_j_and_f(root, pred, split="test-dev")


def test_davis_cli(tiny_davis, capsys):
    root, pred = tiny_davis
    assert run_cli(main, ["davis", "--davis-root", str(root), "--pred", str(pred)]) == 0
    # J = (50 + 90.91 + 100) / 3 = 80.30, F = 250 / 3 = 83.33, J&F = 81.82
    assert capsys.readouterr().out.strip() == "J 80.30  F 83.33  J&F 81.82"
    assert run_cli(main, ["davis", "--davis-root", str(root), "--pred", str(root / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: prediction folder") and error.count("\n") == 1


# Official per-object OSVOS scores on DAVIS-2017 val: means of the per-frame J and F lists (frames
# 1..T-2) published by the DAVIS organisers in davisvideochallenge/davisvideochallenge.github.io,
# json_data/raw_eval/2017/osvos_davis.json. Our per-frame values match every listed frame of these six
# sequences to the file's 4-decimal rounding (checked while writing this module), which also shows that
# the palette annotations derived from the DAVIS-2016 masks equal the 2017 ones for these sequences.
OSVOS_OFFICIAL = {"blackswan_1": (94.301, 97.410), "car-shadow_1": (92.840, 91.741), "dog_1": (71.078, 69.110),
                  "drift-chicane_1": (77.422, 82.889), "libby_1": (62.303, 75.123),
                  "drift-straight_1": (66.546, 70.677)}


def davis_mini():
    shared = shared_data_dir()
    root = shared / "davis_mini" if shared else None
    if root is None or not (root / "results_osvos_davis2017val").is_dir():
        pytest.skip("real DAVIS sample (../shared/data/davis_mini) not present")
    return root


def test_davis_real_ground_truth_against_itself_scores_100():
    root = davis_mini()
    scores = davis_j_and_f(root, root / "Annotations" / "480p")
    assert (scores["J"], scores["F"], scores["J&F"]) == (100.0, 100.0, 100.0)
    assert len(scores["per_object"]) == 6


def test_davis_real_osvos_matches_the_official_scores():
    root = davis_mini()
    scores = davis_j_and_f(root, root / "results_osvos_davis2017val")
    for name, (official_j, official_f) in OSVOS_OFFICIAL.items():
        assert scores["per_object"][name]["J"] == pytest.approx(official_j, abs=0.01), name
        assert scores["per_object"][name]["F"] == pytest.approx(official_f, abs=0.01), name
    # the mean over these six objects of the official values: J 77.415, F 81.158
    assert scores["J"] == pytest.approx(77.415, abs=0.01)
    assert scores["F"] == pytest.approx(81.158, abs=0.01)
    assert scores["J&F"] == pytest.approx((77.415 + 81.158) / 2, abs=0.01)


def test_davis_real_frame_values_of_one_sequence():
    root = davis_mini()
    gt, pred, n_objects, frames = read_sequence(root, root / "results_osvos_davis2017val", "blackswan")
    assert (n_objects, len(frames), frames[0], frames[-1]) == (1, 48, "00001", "00048")
    j_values, f_values = score_sequence(gt[:2], pred[:2], n_objects)
    # first two entries of the official lists: J 0.9391, 0.9456; F 0.9619, 0.9777 (4 decimals)
    np.testing.assert_allclose(j_values[0], [0.9391, 0.9456], atol=5e-5)
    np.testing.assert_allclose(f_values[0], [0.9619, 0.9777], atol=5e-5)


# ------------------------------------------------------------ attention masks

def test_attention_mass_mask_keeps_the_top_sixty_percent():
    # sorted ascending: 0.05 (#3), 0.10 (#0), 0.20 (#2), 0.25 (#4), 0.40 (#1); cumulative sums
    # 0.05, 0.15, 0.35, 0.60, 1.00; keep cumsum > 1 - 0.6 = 0.4 -> patches 4 and 1 (mass 0.65).
    head = np.array([0.10, 0.40, 0.20, 0.05, 0.25])
    halved = head / 2                      # rows do not sum to 1 once the CLS column is dropped
    masks = attention_mass_masks(np.stack([head, halved]), mass=0.6)
    np.testing.assert_array_equal(masks, [[False, True, False, False, True]] * 2)
    # t = 0.8: keep cumsum > 0.2 -> also patch 2 (cumsum 0.35)
    np.testing.assert_array_equal(attention_mass_masks(head[None], mass=0.8)[0], [False, True, True, False, True])


def test_patch_masks_to_pixels_is_nearest_upsampling():
    masks = np.array([[True, False, False, False, False, True]])      # 1 head, grid 2 x 3
    pixels = patch_masks_to_pixels(masks, (2, 3), patch_size=2)
    assert pixels.shape == (1, 4, 6)
    np.testing.assert_array_equal(pixels[0], [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                              [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]])


def test_best_head_jaccard_ignores_void_and_takes_the_best_head():
    labels = np.zeros((4, 4), np.uint8)
    labels[:2, :2], labels[2:, 2:], labels[1, 3] = 1, 2, 255
    heads = np.zeros((2, 4, 4), bool)
    heads[0, :2, :2] = True                # object 1 exactly: IoU 1 (head 1 misses it: IoU 0)
    heads[1, 2:, 2:] = True
    heads[1, 1, 2:] = True                 # two extra pixels, (1, 3) is void
    # object 2: best head 1, intersection 4, union 4 + 1 extra non-void pixel = 5 -> 0.8 (4/6 if void counted)
    assert best_head_jaccard(heads, labels) == pytest.approx((1.0 + 0.8) / 2)
    assert best_head_jaccard(heads, np.where(labels == 255, 255, 0)) is None
    assert mean_jaccard([0.9, None, 0.5]) == pytest.approx(70.0)
