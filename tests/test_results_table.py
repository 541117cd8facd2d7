"""Tests for results/reference/ (the paper's numbers) and evaluate.results_table.

The literal numbers below are the paper's (docs/protocols.md, "Reference numbers"); they are
here only to check the transcription in results/reference/.
"""
from pathlib import Path

import pandas as pd
import pytest

from common.errors import UserError
from evaluate import results_table as rt

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"


def paper_value(table, method, arch, patch, metric, **descriptors):
    """The single paper value of ``table`` matching the given row identity."""
    frame = rt.load_reference(table)
    mask = ((frame["method"] == method) & (frame["arch"] == arch) & (frame["patch"] == patch)
            & (frame["metric"] == metric))
    for column, value in descriptors.items():
        mask &= frame[column] == value
    assert mask.sum() == 1, f"expected one row, found {mask.sum()}"
    return frame.loc[mask, "value"].item()


@pytest.mark.parametrize("table", rt.TABLES)
def test_reference_csv_schema(table):
    raw = pd.read_csv(REFERENCE / f"{table}.csv", dtype=str, keep_default_na=False)
    extras = {"table2_linear_knn": [], "table3_retrieval": ["train_data"],
              "table4_copy_detection": ["dim", "resolution"], "table5_davis": ["train_data"],
              "voc_attention_jaccard": ["mass"]}[table]
    assert list(raw.columns) == list(rt.FIXED_COLUMNS) + extras
    assert set(raw["source"]) == {"paper"}
    assert set(raw["table"]) == {table}
    frame = rt.load_reference(table)
    assert frame["value"].between(0, 100).all()
    assert frame["value"].dtype == float
    # Patch is empty exactly for convnets.
    convnet = frame["arch"].str.startswith("resnet")
    assert (frame.loc[convnet, "patch"] == "").all()
    assert frame.loc[~convnet, "patch"].isin(["16", "8"]).all()
    # No row identity appears twice.
    identity = [c for c in frame.columns if c not in ("value", "source")]
    assert not frame.duplicated(identity).any()


def test_reference_folder_holds_exactly_the_tables():
    assert sorted(p.stem for p in REFERENCE.glob("*.csv")) == sorted(rt.TABLES)
    assert (REFERENCE / "README.md").is_file()


def test_reference_values_match_paper():
    t2 = "table2_linear_knn"
    assert paper_value(t2, "DINO", "vit_small", "16", "knn_top1") == 74.5
    assert paper_value(t2, "DINO", "vit_small", "16", "linear_top1") == 77.0
    assert paper_value(t2, "DINO", "vit_base", "8", "linear_top1") == 80.1
    assert paper_value(t2, "DINO", "resnet50", "", "knn_top1") == 67.5
    assert paper_value(t2, "BYOL*", "vit_small", "16", "knn_top1") == 66.6
    assert paper_value(t2, "DINO (released checkpoint)", "vit_small", "8", "knn_top1") == 78.3
    assert paper_value(t2, "DINO (released checkpoint)", "xcit_medium_24", "8", "linear_top1") == 80.3
    assert paper_value(t2, "DINO 100 ep (README example run)", "vit_small", "16", "knn_top1") == 69.3
    reference = rt.load_reference(t2)
    byol_w2 = reference[(reference["method"] == "BYOL") & (reference["arch"] == "resnet50w2")]
    assert list(byol_w2["metric"]) == ["linear_top1"]  # k-NN is a dash in the paper

    t3 = "table3_retrieval"
    assert paper_value(t3, "DINO", "vit_small", "16", "roxford5k_mAP_medium", train_data="ImageNet") == 41.8
    assert paper_value(t3, "DINO", "vit_small", "16", "roxford5k_mAP_hard", train_data="ImageNet") == 13.7
    assert paper_value(t3, "DINO", "vit_small", "16", "rparis6k_mAP_hard", train_data="GLDv2") == 51.6
    assert paper_value(t3, "DINO", "resnet50", "", "rparis6k_mAP_medium", train_data="ImageNet") == 55.9

    t4 = "table4_copy_detection"
    assert paper_value(t4, "DINO", "vit_base", "8", "copydays_strong_mAP", resolution="320x320") == 85.5
    assert paper_value(t4, "Multigrain", "resnet50", "", "copydays_strong_mAP",
                       resolution="largest side 800", dim="2048") == 82.5

    t5 = "table5_davis"
    assert paper_value(t5, "DINO", "vit_small", "8", "J&F_mean") == 69.9
    assert paper_value(t5, "DINO", "vit_small", "8", "J_mean") == 66.6
    assert paper_value(t5, "DINO", "vit_base", "8", "F_mean") == 74.9

    voc = "voc_attention_jaccard"
    assert paper_value(voc, "DINO", "vit_small", "16", "voc12_jaccard") == 45.9
    assert paper_value(voc, "Random init", "vit_small", "16", "voc12_jaccard") == 22.0
    assert paper_value(voc, "Supervised", "vit_small", "8", "voc12_jaccard") == 23.7
    assert paper_value(voc, "BYOL", "vit_small", "16", "voc12_jaccard") == 47.8
    assert set(rt.load_reference(voc)["mass"]) == {"0.6"}


def test_unknown_table_and_metric_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown results table 'table9'.*table2_linear_knn.*voc_attention_jaccard"):
        rt.load_reference("table9")
    with pytest.raises(UserError) as info:
        rt.measured_rows("table5_davis", "ckpt", "vit_small", 8, {"J&F": 60.0})
    message = str(info.value)
    assert "\n" not in message
    assert "'J&F'" in message and "J&F_mean, J_mean, F_mean" in message
    other_dataset = rt.measured_rows("table3_retrieval", "ckpt", "vit", 8, {"rsynth_mAP_medium": 20.0})
    assert other_dataset["metric"].tolist() == ["rsynth_mAP_medium"]  # any revisitop-layout dataset
    with pytest.raises(UserError, match="unknown metric 'rsynth_mAP'.*or names matching"):
        rt.measured_rows("table3_retrieval", "ckpt", "vit", 8, {"rsynth_mAP": 20.0})
    with pytest.raises(UserError, match="unknown column 'resolution'.*train_data"):
        rt.measured_rows("table3_retrieval", "ckpt", "vit_small", 16, {"roxford5k_mAP_hard": 1.0},
                         resolution="224x224")


def test_measured_rows_schema():
    rows = rt.measured_rows("table4_copy_detection", "ckpt", "vit_base", 8,
                            {"copydays_strong_mAP": 84.25}, dim=1536, resolution="320x320")
    assert rows.to_dict("records") == [{
        "table": "table4_copy_detection", "method": "ckpt", "arch": "vit_base", "patch": "8",
        "metric": "copydays_strong_mAP", "value": 84.25, "source": "measured",
        "dim": "1536", "resolution": "320x320"}]
    convnet = rt.measured_rows("table2_linear_knn", "rn", "resnet50", None, {"knn_top5": 90.0})
    assert convnet["patch"].tolist() == [""]  # measured-only metric accepted
    with pytest.raises(ValueError):
        rt.measured_rows("table2_linear_knn", "ckpt", "vit_small", 16, {"knn_top1": float("nan")})


def knn_rows(method, knn_top1, arch="vit_small", patch=16):
    return rt.measured_rows("table2_linear_knn", method, arch, patch, {"knn_top1": knn_top1})


def measured(path):
    frame = rt.read_table(path)
    return frame[frame["source"] == "measured"]


def test_rewrite_same_checkpoint_replaces_rows(tmp_path):
    rt.write_table(tmp_path, "table2_linear_knn", knn_rows("ckptA", 40.0))
    path = rt.write_table(tmp_path, "table2_linear_knn", knn_rows("ckptA", 42.5))
    rows = measured(path)
    assert rows[["method", "metric", "value"]].values.tolist() == [["ckptA", "knn_top1", 42.5]]
    # The paper's rows are there once, unchanged, after the measured ones.
    frame = rt.read_table(path)
    assert frame["source"].tolist() == ["measured"] + ["paper"] * len(rt.load_reference("table2_linear_knn"))
    pd.testing.assert_frame_equal(frame.iloc[1:].reset_index(drop=True), rt.load_reference("table2_linear_knn"))


def test_two_checkpoints_and_two_metrics_coexist(tmp_path):
    rt.write_table(tmp_path, "table2_linear_knn", knn_rows("ckptB", 30.0, arch="resnet50", patch=None))
    rt.write_table(tmp_path, "table2_linear_knn", knn_rows("ckptA", 40.0))
    linear = rt.measured_rows("table2_linear_knn", "ckptA", "vit_small", 16, {"linear_top1": 55.0})
    path = rt.write_table(tmp_path, "table2_linear_knn", linear)
    rows = measured(path)[["method", "arch", "patch", "metric", "value"]].values.tolist()
    assert rows == [["ckptA", "vit_small", "16", "linear_top1", 55.0],
                    ["ckptA", "vit_small", "16", "knn_top1", 40.0],
                    ["ckptB", "resnet50", "", "knn_top1", 30.0]]
    assert rt.has_measured(tmp_path, "table2_linear_knn", "ckptA", ["knn_top1", "linear_top1"])
    assert not rt.has_measured(tmp_path, "table2_linear_knn", "ckptB", ["linear_top1"])
    assert not rt.has_measured(tmp_path, "table3_retrieval", "ckptA")


def test_descriptive_columns_are_part_of_row_identity(tmp_path):
    def rows(resolution, value):
        return rt.measured_rows("table4_copy_detection", "ckpt", "vit_base", 8,
                                {"copydays_strong_mAP": value}, dim=1536, resolution=resolution)
    rt.write_table(tmp_path, "table4_copy_detection", rows("224x224", 70.0))
    rt.write_table(tmp_path, "table4_copy_detection", rows("320x320", 80.0))
    path = rt.write_table(tmp_path, "table4_copy_detection", rows("320x320", 81.0))
    assert measured(path)[["resolution", "value"]].values.tolist() == [["224x224", 70.0], ["320x320", 81.0]]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch, failing):
    path = rt.write_table(tmp_path, "table2_linear_knn", knn_rows("ckptA", 40.0))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(rt.os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        rt.write_table(tmp_path, "table2_linear_knn", knn_rows("ckptB", 10.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_malformed_previous_file_is_a_user_error(tmp_path):
    (tmp_path / "table5_davis.csv").write_text("not,a,results,table\n1,2,3,4\n")
    with pytest.raises(UserError, match="table5_davis.csv.*delete it"):
        rt.write_table(tmp_path, "table5_davis",
                       rt.measured_rows("table5_davis", "c", "vit_small", 8, {"J_mean": 50.0}))


def test_format_table_aligns_one_line_per_model(tmp_path):
    rows = rt.measured_rows("table5_davis", "mine", "vit_small", 8, {"J&F_mean": 12.345, "J_mean": 10.0},
                            train_data="suite")
    text = rt.format_table(rt.read_table(rt.write_table(tmp_path, "table5_davis", rows)))
    lines = text.splitlines()
    assert lines[1].split() == ["source", "method", "arch", "patch", "train_data", "J&F_mean", "J_mean", "F_mean"]
    assert lines[3].split() == ["measured", "mine", "vit_small", "8", "suite", "12.35", "10.00", "-"]
    dino_s8 = [line for line in lines if line.startswith("paper") and "vit_small  8" in line and "DINO" in line]
    assert dino_s8 and dino_s8[0].split()[-3:] == ["69.9", "66.6", "73.1"]
    # Aligned: every value column ends at the same character position.
    assert len({len(line) for line in lines[1:4]}) == 1


def test_cli_prints_reference_and_rejects_unknown(capsys):
    assert rt.run_cli(rt.main, ["voc_attention_jaccard"]) == 0
    out = capsys.readouterr().out
    assert "Random init" in out and "22.0" in out and "45.9" in out
    assert rt.run_cli(rt.main, ["table7"]) == 2
    assert "unknown results table 'table7'" in capsys.readouterr().err
