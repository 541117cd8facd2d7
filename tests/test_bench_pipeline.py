"""The data-pipeline and end-to-end benches run, time what they say, and print every row (no timing asserted)."""
from __future__ import annotations

import os

import torch

from bench import augment_throughput, end_to_end

TINY = ["--arch", "vit_tiny", "--global-size", "32", "--local-size", "16", "--locals", "2", "--out-dim", "64",
        "--batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--workers", "0"]


def test_write_images_repeats_unique_images_by_hard_link(tmp_path):
    root = end_to_end.write_images(str(tmp_path), end_to_end.UNIQUE_IMAGES + 3)
    files = sorted(os.listdir(f"{root}/c"))
    assert len(files) == end_to_end.UNIQUE_IMAGES + 3
    first, repeat = os.stat(f"{root}/c/{files[0]}"), os.stat(f"{root}/c/{files[end_to_end.UNIQUE_IMAGES]}")
    assert first.st_ino == repeat.st_ino and first.st_nlink == 2


def test_variant_settings_follow_the_variants():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert end_to_end.variant_settings("baseline", cuda) == dict(precision="fp16", augment_on="loader",
                                                                 decode_on="loader")
    assert end_to_end.variant_settings("ours", cuda) == dict(precision="auto")  # the preset's own pipeline
    assert end_to_end.variant_settings("ours-device", cpu)["decode_on"] == "device"


def test_end_to_end_bench_prints_each_pipeline(capsys):
    end_to_end.main(TINY)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["baseline", "ours", "ours-device"]
    assert rows["baseline"][1:3] == ["loader", "loader"] and rows["ours"][1:3] == ["loader", "loader"]
    assert rows["ours-device"][1:3] == ["device", "device"]
    assert rows["baseline"][-1] == "1.00x"
    assert all(float(row[3]) > 0 and float(row[5]) > 0 for row in rows.values())


def test_augment_bench_rows(capsys):
    augment_throughput.main(["--cases", "demo", "--images", "4", "--batch", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines[2:]] == ["pil", "batched-cpu", "decode+draw", "read+draw"]
    assert lines[2].split()[-1] == "1.00x"


def test_end_to_end_bench_demo_preset(capsys):
    end_to_end.main(["--preset", "demo", "--batch", "4", "--steps", "1", "--warmup", "1", "--device", "cpu",
                     "--workers", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert "demo preset: vit/8, 2x32+4x16" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["baseline", "ours"]
    assert rows["baseline"][1:3] == ["loader", "loader"] and rows["ours"][1:3] == ["device", "loader"]
