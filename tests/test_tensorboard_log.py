"""pretrain.tensorboard_log: event files with the records' scalars; never stops a run."""
import sys

import pytest

from pretrain.tensorboard_log import WARNING, TensorBoardLog, numeric_fields, tag_for

STEP = {"kind": "step", "epoch": 0, "iteration": 10, "loss": 5.25, "lr": 1.2e-3, "wd": 0.04,
        "teacher_momentum": 0.996, "teacher_temp": 0.04, "bad_images": 0, "teacher_entropy": 7.5,
        "teacher_student_kl": 0.125, "teacher_batch_entropy": 8.25}
EPOCH = {"kind": "epoch", "epoch": 0, "train_loss": 5.5, "train_lr": 1.5e-3, "train_wd": 0.05,
         "teacher_temp": 0.04, "knn_top1_k20": 31.25, "knn_top5_k20": 70.5, "student_knn_top1_k20": 30.0,
         "student_knn_top5_k20": 69.75}


def read_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tags_of_the_trainer_records():
    assert numeric_fields(STEP) == {
        "train/epoch": 0.0, "train/loss": 5.25, "train/lr": 1.2e-3, "train/wd": 0.04,
        "train/teacher_momentum": 0.996, "train/teacher_temp": 0.04, "data/bad_images": 0.0,
        "collapse/teacher_entropy": 7.5, "collapse/teacher_student_kl": 0.125,
        "collapse/teacher_batch_entropy": 8.25}
    assert numeric_fields(EPOCH) == {
        "epoch/epoch": 0.0, "epoch/train_loss": 5.5, "epoch/train_lr": 1.5e-3, "epoch/train_wd": 0.05,
        "epoch/teacher_temp": 0.04, "knn/knn_top1_k20": 31.25, "knn/knn_top5_k20": 70.5,
        "knn/student_knn_top1_k20": 30.0, "knn/student_knn_top5_k20": 69.75}
    assert tag_for("summary", "images_per_second") == "summary/images_per_second"
    assert numeric_fields({"kind": "summary", "resumed": True, "note": "x", "seconds": 2}) == {"summary/seconds": 2.0}


def test_event_files_hold_the_records(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "run"
    with TensorBoardLog(folder, enabled=True) as log:
        assert log.active
        log.scalars(STEP, step=10)
        log.scalars({**STEP, "iteration": 20, "loss": 4.75}, step=20)
        log.scalars(EPOCH, step=20)
        log.flush()
    assert capsys.readouterr().err == ""
    assert any(path.name.startswith("events.out.tfevents") for path in folder.iterdir())
    scalars = read_scalars(folder)
    expected = {tag: [(10, value)] for tag, value in numeric_fields(STEP).items()}
    expected["train/loss"] = [(10, 5.25), (20, 4.75)]
    for tag in expected:
        if tag != "train/loss":
            expected[tag].append((20, expected[tag][0][1]))
    expected.update({tag: [(20, value)] for tag, value in numeric_fields(EPOCH).items()})
    assert set(scalars) == set(expected)
    for tag, events in expected.items():
        assert [step for step, _ in scalars[tag]] == [step for step, _ in events], tag
        assert [value for _, value in scalars[tag]] == pytest.approx([value for _, value in events], rel=1e-6), tag


def test_disabled_writes_nothing(tmp_path, capsys):
    log = TensorBoardLog(tmp_path / "run", enabled=False)
    log.scalars(STEP, 1)
    log.flush()
    log.close()
    assert not log.active and not (tmp_path / "run").exists()
    assert capsys.readouterr().err == ""


def test_tensorboard_missing_is_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    log = TensorBoardLog(tmp_path / "run", enabled=True)
    for step in range(3):
        log.scalars(STEP, step)
    log.flush()
    log.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("warning: TensorBoard event files are off: the tensorboard package cannot be imported")
    assert err[0].endswith("; the run goes on (log.jsonl has every record)")
    assert not log.active and not (tmp_path / "run").exists()


def test_unwritable_folder_is_one_warning(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    log = TensorBoardLog(blocker / "run", enabled=True)  # fails even for root: a file is in the way
    log.scalars(STEP, 1)
    log.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: TensorBoard event files are off: cannot write event files in")
    assert not log.active


def test_failure_while_running_is_one_warning(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    log = TensorBoardLog(tmp_path / "run", enabled=True)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    log.writer.add_scalar = full_disk
    for step in range(3):
        log.scalars(STEP, step)
    log.flush()
    log.close()
    err = capsys.readouterr().err.splitlines()
    assert err == [WARNING.format(reason=f"writing to '{tmp_path / 'run'}' failed "
                                         "(OSError: [Errno 28] No space left on device)")]
