"""make report end to end on a tiny run: every section, opened in headless Chromium; bad inputs degrade it gracefully."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from analysis import report
from data.errors import run_cli
from evaluate import eval_all, results_table as rt
from pretrain import train as train_cli
from pretrain.checkpoint import atomic_save, safe_load

from browser import open_page
from evaluator_trees import write_tiny_suite
from figure_checks import assert_not_blank

# figures the tiny run must produce: curves (3), one attention map per VOC val image (3), t-SNE and k-NN
# neighbours, one retrieval grid (one dataset), copy-detection hits, one DAVIS sequence
EXPECTED_FIGURES = 3 + 3 + 2 + 1 + 1 + 1


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A 2-epoch demo-preset run on a tiny suite (k-NN monitor each epoch), its eval-all tables, its report."""
    root = tmp_path_factory.mktemp("report")
    data = write_tiny_suite(root / "suite")
    run = root / "runs" / "tiny"
    assert train_cli.main(["--preset", "demo", "--data", str(data / "classification" / "train"),
                           "--knn-data", str(data / "classification"), "--knn-every", "1", "--epochs", "2",
                           "--batch-size-per-gpu", "8", "--log-every-steps", "1", "--num-workers", "0",
                           "--output-dir", str(run)]) == 0
    out = root / "results" / "tiny"
    assert run_cli(eval_all.main, ["--ckpt", str(run / "checkpoint.pth"), "--data-root", str(data), "--out", str(out),
                                   "--num-workers", "0", "--no-progress", "--linear-epochs", "2"]) == 0
    path, sections = report.build_report(str(run / "checkpoint.pth"), out, data)
    return dict(data=data, run=run, out=out, path=path, sections=sections)


def warnings_of(sections) -> list[str]:
    return [warning for section in sections for warning in section.warnings]


def test_every_section_is_built_without_warnings(tiny_report):
    sections = tiny_report["sections"]
    assert not any(section.failed for section in sections)
    assert warnings_of(sections) == []
    figures = sorted((tiny_report["out"] / "figures").glob("*.png"))
    assert len(figures) == EXPECTED_FIGURES, [f.name for f in figures]
    for figure in figures:
        assert_not_blank(figure)


def test_report_opens_in_a_real_browser(tiny_report, tmp_path):
    check = open_page(tiny_report["path"], tmp_path / "report.png")
    assert check.errors == []
    assert check.broken_images == []
    assert check.images == EXPECTED_FIGURES  # every figure embedded, nothing else
    tables = [table for table in rt.TABLES if (tiny_report["out"] / f"{table}.csv").is_file()]
    assert len(tables) == 5
    assert all(table in check.headings for table in tables)
    assert check.tables >= len(tables) + 1  # + the model table
    assert_not_blank(check.screenshot)


def test_browser_check_catches_a_broken_page(tmp_path):
    """The browser check can fail: a missing image and a script error are both reported."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><h2>x</h2><img alt="gone" src="missing.png">'
                    "<script>notDefined();</script></body></html>")
    check = open_page(page, tmp_path / "broken.png")
    assert check.broken_images == ["gone"]
    assert any("notDefined" in error for error in check.errors)
    assert any("missing.png" in error for error in check.errors)


def test_tables_show_our_numbers_beside_the_papers(tiny_report):
    page = tiny_report["path"].read_text()
    for table in ("table2_linear_knn", "voc_attention_jaccard"):
        frame = rt.read_table(tiny_report["out"] / f"{table}.csv")
        section = page.split(f"<h3>{table}</h3>", 1)[1].split("</table>", 1)[0]
        for _, row in frame.iterrows():
            assert f"<td>{row['value']:.2f}</td>" in section
        measured_rows = re.findall(r'<tr class="measured">', section)
        paper_rows = re.findall(r'<tr class="paper">', section)
        assert len(measured_rows) == 1 and len(paper_rows) >= 1


def test_curves_hold_collapse_monitors_and_teacher_student_knn(tiny_report):
    records = [json.loads(line) for line in (tiny_report["run"] / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record["kind"] == "epoch"]
    assert all("knn_top1_k20" in record and "student_knn_top1_k20" in record for record in epochs)
    page = tiny_report["path"].read_text()
    for title in ("Training curves", "Collapse monitors", "Teacher vs student k-NN"):
        assert f'alt="{title}"' in page


def copy_run(tiny_report, tmp_path):
    run = tmp_path / "runs" / "copy"
    shutil.copytree(tiny_report["run"], run)
    return run


def test_truncated_log_line_is_a_warning_and_the_curves_are_still_drawn(tiny_report, tmp_path):
    run = copy_run(tiny_report, tmp_path)
    with open(run / "log.jsonl", "a") as log:
        log.write('{"kind": "step", "epoch": 1, "itera')
    path, sections = report.build_report(str(run / "checkpoint.pth"), tmp_path / "out", tiny_report["data"])
    assert any("is truncated" in warning for warning in warnings_of(sections))
    page = path.read_text()
    assert 'alt="Training curves"' in page and "is truncated" in page


def test_checkpoint_without_teacher_uses_the_student(tiny_report, tmp_path):
    run = copy_run(tiny_report, tmp_path)
    checkpoint = safe_load(run / "checkpoint.pth")
    del checkpoint["teacher"]
    atomic_save(checkpoint, run / "checkpoint.pth")
    path, sections = report.build_report(str(run / "checkpoint.pth"), tmp_path / "out", tiny_report["data"])
    assert any("has no teacher" in warning for warning in warnings_of(sections))
    assert not any(section.failed for section in sections)
    assert len(list((tmp_path / "out" / "figures").glob("attention_*.png"))) == 3


def test_bad_images_are_named_and_the_good_one_is_drawn(tiny_report, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text")
    empty = tmp_path / "empty"
    empty.mkdir()
    good = sorted((tiny_report["data"] / "voc").rglob("JPEGImages/*.jpg"))[0]
    path, sections = report.build_report(str(tiny_report["run"] / "checkpoint.pth"), tmp_path / "out",
                                         tiny_report["data"], images=[not_an_image, empty, good])
    warnings = " | ".join(warnings_of(sections))
    assert "notes.jpg" in warnings and "empty" in warnings
    assert [p.name for p in (tmp_path / "out" / "figures").glob("attention_*.png")] == [f"attention_{good.stem}.png"]


def test_nothing_to_report_is_one_line_and_exit_2(tmp_path, capsys):
    status = run_cli(report.main, ["--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "nothing to report" in err and "missing.pth" in err
    assert not (tmp_path / "out").exists()


def test_random_twin_weights_are_not_the_trained_ones(tiny_report):
    """The report describes the trained teacher (its fingerprint), not a fresh initialisation."""
    trained = safe_load(tiny_report["run"] / "checkpoint.pth")["teacher"]
    subject, warnings = report.load_model(str(tiny_report["run"] / "checkpoint.pth"), None, None, 0)
    assert warnings == []
    weights = subject.model.state_dict()
    assert torch.equal(weights["pos_embed"], trained["backbone.pos_embed"])
