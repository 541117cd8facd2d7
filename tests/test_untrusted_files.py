"""Every reader of a file a user hands us refuses a pickle that would run code, and never runs it.

Each payload would create a marker file if it ran (through os.system, builtins.eval or
subprocess.call); each test asserts the refusal and that the marker does not exist. Files come as a
torch zip checkpoint (the payload inside ``data.pkl``, where ``torch.save`` puts it), a legacy
(non-zip) torch file and a plain pickle.

Loaders covered (the project has no ``np.load(allow_pickle=True)``, no ``pickle.load`` and no
``torch.load`` outside these two modules; grep before adding one):

* ``pretrain.checkpoint.safe_load``, the one ``torch.load`` of the project, and through it
  ``pretrain.load_backbone`` (our, official and timm checkpoints), ``load_backbone_with_args``
  (``--random-like``), ``pretrain.checkpoint_files.load_training_checkpoint`` (resume), the trainer's
  resume (``python -m pretrain.train``), the feature cache (``evaluate.features.read_cache``,
  through ``FeatureExtractor``: a refused cache file is a miss, with a warning, and is recomputed);
* every command that takes ``--ckpt`` / ``--random-like``: evaluate.knn, linear, retrieval,
  copy_detection, video_segmentation, attention_masks, eval_all; analysis.attention, embeddings,
  neighbours, report (in process through ``run_cli``, and ``python -m evaluate.knn`` as a real process);
* ``data.safe_pickle.load_pickle_file`` / ``safe_loads``, and through them the revisitop ground truth
  (``data.revisitop.load_ground_truth``, ``RevisitopDataset``, ``python -m evaluate.retrieval``).

Also here: forged numpy scalars and dtypes, which ``safe_load`` resolves to checked stand-ins.
"""
from __future__ import annotations

import argparse
import builtins
import copyreg
import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from evaluator_trees import files_under, pattern_image, save_image, tiny_vit

from common.errors import UserError, run_cli
from common.transforms import eval_transform
from data import safe_pickle
from data.revisitop import RevisitopDataset, load_ground_truth
from evaluate.features import FeatureExtractor, FeatureSpec
from pretrain import load_backbone
from pretrain.checkpoint import load_backbone_with_args, safe_load
from pretrain.checkpoint_files import load_training_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar


class Call:
    """Pickles as ``function(*args)`` (with ``state`` applied after, when given)."""

    def __init__(self, function, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def payload(kind: str, marker: Path) -> Call:
    """A pickled call that creates ``marker`` if it ever runs."""
    if kind == "os.system":
        return Call(os.system, f"touch '{marker}'")
    if kind == "builtins.eval":
        return Call(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    return Call(subprocess.call, ["touch", str(marker)])


PAYLOADS = ["os.system", "builtins.eval", "subprocess.call"]
FORMATS = ["torch-zip", "torch-legacy", "plain-pickle"]


def write_file(path: Path, content, file_format: str) -> Path:
    if file_format == "plain-pickle":
        path.write_bytes(pickle.dumps(content, protocol=2))
    else:
        torch.save(content, path, _use_new_zipfile_serialization=file_format == "torch-zip")
    return path


def evil_checkpoint(tmp_path: Path, kind: str = "os.system", file_format: str = "torch-zip",
                    name: str = "evil.pth") -> tuple[Path, Path]:
    """(a checkpoint whose teacher is a payload, the marker the payload would create)."""
    marker = tmp_path / f"ran-{kind}-{file_format}"
    return write_file(tmp_path / name, {"teacher": payload(kind, marker), "epoch": 1}, file_format), marker


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- safe_load: code and forged numpy values

@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_safe_load_refuses_every_payload_in_every_format(tmp_path, kind, file_format):
    path, marker = evil_checkpoint(tmp_path, kind, file_format)
    with pytest.raises(UserError) as error:
        safe_load(path)
    message = one_line(error.value)
    assert f"checkpoint '{path}' holds objects that are not weights" in message and "re-save it" in message
    assert not marker.exists()


def forged_dtype(code: str, state: tuple) -> Call:
    return Call(np.dtype, code, False, True, state=state)


class BareDtype:
    """Pickles as ``numpy.dtype.__new__(numpy.dtype)``: a dtype that skipped its constructor."""

    @property
    def __class__(self):
        return np.dtype

    def __reduce__(self):
        return (copyreg.__newobj__, (np.dtype,))


PLAIN_STATE = (3, "<", None, None, None, -1, -1, 0)
FORGERIES = {
    "object dtype": (Call(SCALAR, np.dtype("O"), b"\0" * 8), "refused dtype (numpy dtype O8)"),
    "str dtype": (Call(SCALAR, np.dtype("U2"), b"\0" * 8), "refused numpy dtype <U2: not a plain number type"),
    "structured state": (Call(SCALAR, forged_dtype("f8", (3, "|", None, ("a",), {"a": ("x", 0)}, 8, 1, 0)), b"\0" * 8),
                         "structured or sub-array"),
    "object flags": (Call(SCALAR, forged_dtype("f8", PLAIN_STATE[:7] + (63,)), b"\0" * 8), "f8 with flags 63"),
    "short bytes": (Call(SCALAR, np.dtype("f8"), b"\0" * 3), "float64 scalar from 3 bytes (needs 8 bytes)"),
    "long bytes": (Call(SCALAR, np.dtype("i4"), b"\0" * 16), "int32 scalar from 16 bytes (needs 4 bytes)"),
    "not bytes": (Call(SCALAR, np.dtype("f8"), [1, 2]), "float64 scalar from a list"),
    "not a dtype": (Call(SCALAR, argparse.Namespace(), b"\0" * 8), "scalar of a Namespace"),
    "no constructor": (Call(SCALAR, BareDtype(), b"\0" * 8), "has no attribute 'code'"),
    # a Namespace turned into a dtype recipe by assigning __class__ (pickle's slot state), with code 'O8'
    "class swap": (Call(SCALAR, Call(argparse.Namespace, state=({"code": "O8", "byteorder": "="},
                                                                 {"__class__": np.dtype})), b"\0" * 8),
                   "refused numpy dtype |O: not a plain number type"),
}


@pytest.mark.parametrize("file_format", ["torch-zip", "torch-legacy"])
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_numpy_values_are_refused(tmp_path, forgery, file_format):
    # numpy's own reconstructors would trust these; the stand-ins accept plain numbers of the exact size only
    value, reason = FORGERIES[forgery]
    path = write_file(tmp_path / "forged.pth", {"optimizer": {"lr": value}}, file_format)
    with pytest.raises(UserError) as error:
        safe_load(path)
    message = one_line(error.value)
    assert f"checkpoint '{path}' holds objects that are not weights" in message and reason in message


# ---------------------------------------------------------------- the Python entry points that read checkpoints

@pytest.mark.parametrize("file_format", FORMATS)
def test_load_backbone_refuses(tmp_path, file_format):
    path, marker = evil_checkpoint(tmp_path, "builtins.eval", file_format)
    for load in (lambda: load_backbone(path), lambda: load_backbone(path, key="student"),
                 lambda: load_backbone_with_args(path, random_weights=True)):
        with pytest.raises(UserError, match="not weights") as error:
            load()
        assert str(path) in one_line(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("file_format", FORMATS)
def test_training_resume_refuses_and_falls_back(tmp_path, file_format):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": 10, "teacher": {"w": torch.ones(2)}}, run / "checkpoint-it00000010.pth")
    evil, marker = evil_checkpoint(run, "subprocess.call", file_format, name="checkpoint-it00000020.pth")
    state, path, warnings = load_training_checkpoint(run)
    assert state["step"] == 10 and path == run / "checkpoint-it00000010.pth"
    assert len(warnings) == 1 and str(evil) in warnings[0] and "not weights" in warnings[0]
    (run / "checkpoint-it00000010.pth").unlink()
    with pytest.raises(UserError, match="checkpoint-it00000020.pth holds objects that are not weights") as error:
        load_training_checkpoint(run)
    one_line(error.value)
    assert not marker.exists()


TINY_RUN = {"arch": "vit", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32,
            "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "global_crops_size": 32, "local_crops_size": 16,
            "local_crops_number": 2, "batch_size_per_gpu": 4, "num_workers": 0, "epochs": 1, "warmup_epochs": 0}


def test_trainer_resume_refuses(tmp_path, capsys):
    from pretrain.train import main as train_main
    for index in range(8):
        save_image(pattern_image(index, (32, 32)), tmp_path / "data" / f"class{index % 2}" / f"{index}.png")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    _, marker = evil_checkpoint(output_dir, "os.system", name="checkpoint.pth")
    flags = [item for key, value in {**TINY_RUN, "data": tmp_path / "data", "output_dir": output_dir}.items()
             for item in ("--" + key.replace("_", "-"), str(value))]
    assert run_cli(train_main, ["--preset", "vanilla", *flags]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "checkpoint.pth" in errors[0] and "not weights" in errors[0]
    assert not marker.exists()


def test_feature_cache_refused_is_a_miss_and_is_recomputed(tmp_path, capsys):
    for index in range(4):
        save_image(pattern_image(index), tmp_path / "data" / f"class{index % 2}" / f"{index}.png")
    from data.imagefolder import ImageFolder
    dataset = ImageFolder(tmp_path / "data", eval_transform(32))
    extractor = FeatureExtractor(tiny_vit(), device="cpu", batch_size=4, num_workers=0, cache_dir=tmp_path / "cache",
                                 progress=False)
    features, labels = extractor(dataset, FeatureSpec(), "train")
    cache_file, = files_under(tmp_path / "cache")
    marker = tmp_path / "ran-cache"
    torch.save({"key": payload("os.system", marker), "features": features, "labels": labels}, cache_file)
    capsys.readouterr()
    recomputed, _ = extractor(dataset, FeatureSpec(), "train")
    assert torch.equal(recomputed, features) and not marker.exists()
    warning = capsys.readouterr().out.strip()
    assert warning.startswith(f"feature cache '{cache_file}' holds objects that are not weights")
    assert warning.endswith("; recomputing") and len(warning.splitlines()) == 1
    assert "\n" not in warning and "recomputing" in warning
    assert torch.equal(safe_load(cache_file)["features"], features)  # replaced by a good entry


# ---------------------------------------------------------------- the commands that take --ckpt / --random-like

COMMANDS = [("evaluate.knn", ["--data", "nowhere"]), ("evaluate.linear", ["--data", "nowhere"]),
            ("evaluate.retrieval", ["--data", "nowhere", "--datasets", "roxford5k"]),
            ("evaluate.copy_detection", ["--data", "nowhere"]), ("evaluate.video_segmentation", ["--davis", "nowhere"]),
            ("evaluate.attention_masks", ["--voc", "nowhere"]), ("evaluate.eval_all", []),
            ("analysis.attention", ["--images", "nowhere"]), ("analysis.embeddings", ["--data", "nowhere"]),
            ("analysis.neighbours", []), ("analysis.report", [])]


CASES = [(module, arguments, flag) for flag in ("--ckpt", "--random-like") for module, arguments in COMMANDS
         if not (flag == "--random-like" and module == "analysis.report")]  # the report reads --ckpt only


@pytest.mark.parametrize("module,arguments,flag", CASES, ids=[f"{module} {flag}" for module, _, flag in CASES])
def test_every_command_refuses_with_one_line(tmp_path, monkeypatch, capsys, module, arguments, flag):
    main = importlib.import_module(module).main
    monkeypatch.chdir(tmp_path)  # whatever a command would write goes under tmp_path
    path, marker = evil_checkpoint(tmp_path, "os.system")
    assert run_cli(main, [flag, str(path), *arguments]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(path) in errors[0]
    assert "not weights" in errors[0] and not marker.exists()


def test_knn_command_in_a_real_process(tmp_path):
    path, marker = evil_checkpoint(tmp_path, "subprocess.call", "plain-pickle")
    done = subprocess.run([sys.executable, "-m", "evaluate.knn", "--ckpt", str(path), "--data", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and str(path) in done.stderr
    assert "not weights" in done.stderr and not marker.exists()


# ---------------------------------------------------------------- ground-truth pickles (revisitop)

def evil_gnd(folder: Path, kind: str, protocol: int) -> tuple[Path, Path]:
    marker = folder / f"ran-gnd-{kind}-{protocol}"
    gnd = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": payload(kind, marker), "easy": [], "hard": [],
                                                       "junk": []}]}
    path = folder / "roxford5k" / "gnd_roxford5k.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(gnd, protocol=protocol))
    return path, marker


@pytest.mark.parametrize("protocol", [0, 2, 3, 5])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_ground_truth_readers_refuse(tmp_path, kind, protocol):
    path, marker = evil_gnd(tmp_path, kind, protocol)
    for read in (lambda: safe_pickle.load_pickle_file(path),
                 lambda: safe_pickle.safe_loads(path.read_bytes(), str(path)),
                 lambda: load_ground_truth(path), lambda: RevisitopDataset(tmp_path, "roxford5k")):
        with pytest.raises(UserError, match="refusing to unpickle") as error:
            read()
        assert str(path) in one_line(error.value)
    assert not marker.exists()


def test_ground_truth_reader_refuses_a_torch_zip(tmp_path):
    path = tmp_path / "gnd_roxford5k.pkl"
    _, marker = evil_checkpoint(tmp_path, "os.system", name=path.name)
    with pytest.raises(UserError, match="damaged or not a pickle") as error:
        load_ground_truth(path)
    assert str(path) in one_line(error.value) and not marker.exists()


def test_retrieval_command_refuses_an_evil_ground_truth(tmp_path, monkeypatch, capsys):
    from evaluate.retrieval import main as retrieval_main
    path, marker = evil_gnd(tmp_path / "data", "builtins.eval", 3)
    monkeypatch.chdir(tmp_path)
    assert run_cli(retrieval_main, ["--ckpt", "random", "--arch", "vit_tiny", "--patch", "16",
                                    "--data", str(tmp_path / "data"), "--no-cache"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and f"refusing to unpickle '{path}'" in errors[0] and "builtins.eval" in errors[0]
    assert not marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_payloads_do_run_when_unpickled_unsafely(tmp_path, kind):
    # the control: without it, "the marker does not exist" could hold because the payload never works
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(payload(kind, marker), protocol=2))
    assert marker.exists()
