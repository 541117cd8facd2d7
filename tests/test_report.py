"""make report end to end on a tiny run: every section, opened in headless Chromium;
bad inputs degrade it gracefully."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from browser import open_page
from evaluator_trees import write_tiny_suite
from figure_checks import assert_not_blank

from analysis import report
from common.errors import run_cli
from evaluate import eval_all
from evaluate import results_table as rt
from evaluate.emergence import ROWS, diagnose
from evaluate.model_source import load_model_source
from pretrain import train as train_cli
from pretrain.checkpoint import atomic_save, safe_load

# figures the tiny run must produce: curves (3), one attention map per VOC val image (3) for the trained teacher
# and as many for its random twin, t-SNE and k-NN neighbours, one retrieval grid (one dataset), copy-detection
# hits, one DAVIS sequence
ATTENTION_FIGURES = 2 * 3
EXPECTED_FIGURES = 3 + ATTENTION_FIGURES + 2 + 1 + 1 + 1


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
    assert "Emergence" in check.headings and "Attention maps" in check.headings
    assert check.tables >= len(tables) + 2  # + the model table and the emergence table
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
    assert len(list((tmp_path / "out" / "figures").glob("attention_*.png"))) == ATTENTION_FIGURES  # twin too
    assert emergence_table(path.read_text())[0] == ["diagnostic", "random init", "DINO (student)"]


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
    assert sorted(p.name for p in (tmp_path / "out" / "figures").glob("attention_*.png")) == \
        [f"attention_random-init_{good.stem}.png", f"attention_{good.stem}.png"]


def test_nothing_to_report_is_one_line_and_exit_2(tmp_path, capsys):
    status = run_cli(report.main, ["--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "nothing to report" in err and "missing.pth" in err
    assert not (tmp_path / "out").exists()


def test_random_twin_weights_are_not_the_trained_ones(tiny_report):
    """The report describes the trained teacher (its fingerprint), not a fresh initialisation."""
    trained = safe_load(tiny_report["run"] / "checkpoint.pth")["teacher"]
    subject, warnings = report.load_reported_model(str(tiny_report["run"] / "checkpoint.pth"), None, None, 0)
    assert warnings == []
    weights = subject.model.state_dict()
    assert torch.equal(weights["pos_embed"], trained["backbone.pos_embed"])


def emergence_table(page: str) -> list[list[str]]:
    """The Emergence section's table as rows of cell texts (the header row first)."""
    table = page.split("<h2>Emergence</h2>", 1)[1].split("</table>", 1)[0]
    return [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]


def test_emergence_table_compares_the_twin_the_teacher_and_the_student(tiny_report):
    rows = emergence_table(tiny_report["path"].read_text())
    assert rows[0] == ["diagnostic", "random init", "DINO (teacher)", "DINO (student)"]
    assert [row[0] for row in rows[1:]] == list(ROWS.values())
    checkpoint = str(tiny_report["run"] / "checkpoint.pth")
    models = [load_model_source(random_like=checkpoint), load_model_source(checkpoint),
              load_model_source(checkpoint, key="student")]
    by_key = {key: row[1:] for key, row in zip(ROWS, rows[1:])}
    for column, subject in enumerate(models):
        diagnosis = diagnose(subject.model, tiny_report["data"], subject.train_args, device="cpu")
        for key in ("knn20_top1", "mean_pairwise_cosine", "effective_rank", "best_head_object_share", "object_area"):
            assert float(by_key[key][column]) == pytest.approx(diagnosis[key], abs=0.006), (key, column)
        assert by_key["per_head_object_share"][column] == " / ".join(
            f"{share:.1f}" for share in diagnosis["per_head_object_share"])
    # the teacher's 20-NN top-1 is eval-all's, read back from its feature cache
    frame = rt.read_table(tiny_report["out"] / "table2_linear_knn.csv")
    measured = frame[(frame["source"] == rt.MEASURED) & (frame["metric"] == "knn_top1")]["value"]
    assert float(by_key["knn20_top1"][1]) == pytest.approx(float(measured.iloc[0]), abs=0.006)
    assert by_key["per_head_object_share"][1].count(" / ") == 1  # the demo preset's two heads


def test_attention_maps_show_the_random_twin_beside_the_model(tiny_report):
    page = tiny_report["path"].read_text()
    section = page.split("<h2>Attention maps</h2>", 1)[1].split("<h2>", 1)[0]
    assert section.count("<b>random init</b><b>DINO (teacher)</b>") == 1
    alts = re.findall(r'<img alt="([^"]*)"', section)
    assert len(alts) == ATTENTION_FIGURES
    images = sorted(path.name for path in (tiny_report["data"] / "voc").rglob("JPEGImages/*.jpg"))[:3]
    assert alts == [alt for name in images for alt in (f"random init: {name}", name)]  # twin left, model right
    twin = (tiny_report["out"] / "figures" / f"attention_random-init_{Path(images[0]).stem}.png").read_bytes()
    trained = (tiny_report["out"] / "figures" / f"attention_{Path(images[0]).stem}.png").read_bytes()
    assert twin != trained


def test_a_released_backbone_has_no_twin_and_no_warning_about_it(tiny_report, tmp_path):
    teacher = safe_load(tiny_report["run"] / "checkpoint.pth")["teacher"]
    released = tmp_path / "released" / "backbone.pth"
    released.parent.mkdir()
    atomic_save({key.removeprefix("backbone."): value for key, value in teacher.items()
                 if key.startswith("backbone.")}, released)
    path, sections = report.build_report(str(released), tmp_path / "out", tiny_report["data"])
    assert not any(section.failed for section in sections)
    assert not any("twin" in warning or "random" in warning for warning in warnings_of(sections))
    assert emergence_table(path.read_text())[0] == ["diagnostic", "DINO (teacher)"]
    assert len(list((tmp_path / "out" / "figures").glob("attention_*.png"))) == 3
    assert "side-by-side" not in path.read_text().split("<h2>Attention maps</h2>", 1)[1].split("<h2>", 1)[0]
