"""`make gpu-check`: its CPU dry run end to end, and how it records failed, timed-out and too-large steps."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_runs import REPO

from bench import gpu_check
from bench.gpu_check import Step, run_steps
from common.errors import run_cli


def test_make_gpu_check_dry_runs_every_step_and_prints_the_table_last(tmp_path):
    done = subprocess.run(["make", "-s", "gpu-check", "DRY=1", f"GPU_CHECK_OUT={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = list(tmp_path.glob("*-dry-cpu.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").is_file()
    report = json.loads(reports[0].read_text())
    names = [step["name"] for step in report["steps"]]
    assert names == [step.name for step in gpu_check.plan(dry=True)]
    assert names[:2] == ["environment", "pytest -m cuda"] and names[-1] == "train step vit_small/8 ours-compile"
    status = {step["name"]: step["status"] for step in report["steps"]}
    assert all(value == "ok" for name, value in status.items() if "compile" not in name), status
    by_name = {step["name"]: step for step in report["steps"]}
    # pytest ran the cuda-marked tests, all skipped here
    assert by_name["pytest -m cuda"]["result"]["skipped"] >= 5 and by_name["pytest -m cuda"]["result"]["passed"] == 0
    # the end-to-end files held every odd kind, and the truncated one was skipped
    e2e = by_name["end-to-end vit_small/16"]["result"]
    assert {"cmyk", "png", "truncated"} <= set(e2e["kinds"]) and e2e["bad_images_skipped"] >= 1
    assert 0.0 <= e2e["data_wait_share"] <= 1.0 and e2e["images_per_s"] > 0
    # the one-process torchrun run is distributed: DDP around student and teacher (BatchNorm head)
    demo = by_name["distributed"]["result"]["runs"]["demo"]["setup"]
    assert demo["distributed"] and demo["ddp_student"] and demo["ddp_teacher"] and demo["batchnorm"]
    assert by_name["train step vit_small/16 baseline"]["result"]["flops_per_image"] > 0
    assert by_name["train step vit_small/16 ours"]["result"]["flops_from_baseline"] > 0
    table = reports[0].with_suffix(".md").read_text().strip()
    assert done.stdout.rstrip().endswith(table)
    assert "| distributed | ok |" in table


def fake(code: str) -> list[str]:
    return ["-c", code]


def test_a_failed_or_timed_out_step_is_recorded_and_the_next_still_runs(tmp_path):
    write_ok = "import json, sys; json.dump({'value': 1}, open(sys.argv[1], 'w'))"
    steps = [Step("crashes", fake("raise SystemExit('error: the GPU fell off')"), 30),
             Step("hangs", fake("import time; time.sleep(60)"), 1.5),
             Step("reports a failure", fake("import json, sys; json.dump({'failed': ['demo']}, open(sys.argv[1], 'w'))")
                  + ["{json}"], 30),
             Step("fine", fake(write_ok) + ["{json}"], 30)]
    lines = []
    records = run_steps(steps, budget_s=60, progress=lines.append)
    assert [r["status"] for r in records] == ["failed", "timeout", "failed", "ok"]
    assert "the GPU fell off" in records[0]["error"]
    assert records[1]["seconds"] < 10 and "stopped after" in records[1]["error"]
    assert records[2]["error"] == "demo"
    assert records[3]["result"] == {"value": 1}
    assert len(lines) == 4 and "crashes: failed" in lines[0] and "the GPU fell off" in lines[0]


def test_the_budget_skips_what_it_cannot_fit():
    steps = [Step("slow", fake("import time; time.sleep(3)"), 30), Step("never", fake("pass"), 30)]
    records = run_steps(steps, budget_s=6, progress=lambda line: None)
    assert records[0]["status"] == "failed" and "wrote no result" in records[0]["error"]
    assert records[1]["status"] == "skipped" and "out of time" in records[1]["reason"]


def test_the_largest_batch_that_fits_is_found_and_reused():
    """A row that runs out of memory is retried at the next batch; later rows of that model start there."""
    code = ("import json, sys; b = int(sys.argv[sys.argv.index('--batch') + 1]);"
            "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB') or sys.exit(1) if b > 64 "
            "else print('VARIANT-RESULT ' + json.dumps({'batch': b, 'flops_per_image': None}))")
    argv = fake(code) + ["--batch", "128"]
    steps = [Step("train step vit_small/8 baseline", argv, 60, kind="variant", batches=(128, 96, 64, 32)),
             Step("train step vit_small/8 ours", argv, 60, kind="variant", batches=(128, 96, 64, 32))]
    records = run_steps(steps, budget_s=120, progress=lambda line: None)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert records[0]["result"]["batch"] == 64 and records[0]["result"]["too_large_batches"] == [128, 96]
    assert records[1]["result"]["batch"] == 64 and "too_large_batches" not in records[1]["result"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    assert run_cli(gpu_check.main, ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no CUDA GPU here") and "DRY=1" in err
    assert not any(tmp_path.iterdir())


def test_the_module_entry_point_exits_2_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the machine without a GPU")
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no CUDA GPU here")
