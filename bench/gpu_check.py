"""`make gpu-check`: the GPU path checked in one go, every step in its own process under its own time limit.

    python -m bench.gpu_check [--out results/gpu] [--budget 480] [--env-seconds S]
    python -m bench.gpu_check --dry [--out DIR]          # the CPU dry run (tiny sizes), part of `make test`

Steps, in this order (``--budget`` seconds in all; a step gets at most its own box and what is left of the
budget; a step that fails or runs out of time is recorded with its error and the next one runs):

1. environment: GPU, driver, CUDA, torch, FAISS, nvJPEG (`bench.gpu_steps`);
2. ``pytest -m cuda``: every test marked ``cuda`` (nvJPEG against libjpeg, crops on the GPU against the CPU,
   a bf16 step against an fp32 one, bf16 against fp32 features, FAISS on the GPU against the CPU,
   SyncBatchNorm under a one-process NCCL group, ...);
3. the train step alone (`bench.train_throughput`, one process per row): ViT-S/16 and ViT-S/8, 2x224 +
   10x96 crops, batch 128 (ViT-S/8: the largest of 128, 96, 64, 32 that fits, named), the official
   choices (baseline) against ours: images/s, peak memory, MFU against the matmul peak measured in the row's
   dtype;
4. end to end from ImageNet-like JPEG files through the trainer's own loader, ViT-S/16 and ViT-S/8:
   images/s, the share of time the step waits for data, what the device-side decode + crops cost per batch;
5. the distributed path: torchrun with NCCL around `pretrain.train` (demo preset and ViT-S/16; with two
   GPUs, two processes against one at the same global batch);
6. bf16 feature extraction at batch 256, and FAISS k-NN over 1M x 384 on the GPU against the CPU;
7. ours under ``--compile on`` for both ViT-S (last: compiling is the step most likely to take long).

It writes ``<out>/<date>-<gpu>.json`` (every step: status, seconds, result or error) and ``.md`` (the
table), and prints the table last. Exit status: 0 when every step passed, 1 when one failed or timed out,
2 when there is no CUDA GPU (the dry run aside).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from bench.train_throughput import RESULT_TAG
from bench.variant_process import REPO
from common.atomic import atomic_write_text
from common.errors import UserError, run_cli

BUDGET_S = 480.0  # 8 minutes for the whole check, the environment already built
S8_BATCHES = (128, 96, 64, 32)
TARGETS = {  # the targets on one H100 (benchmarks: reported, never asserted)
    "end-to-end vit_small/16": ("images_per_s", 2500.0),
    "end-to-end vit_small/8": ("images_per_s", 500.0),
}
CROPS_MS_LIMIT = 20.0  # decode + crops per batch of 128 on the device; above it, overlap them with the step


@dataclass
class Step:
    """One measurement: ``python *argv`` in its own process group, at most ``box_s`` seconds.

    ``kind``: ``json`` (the command writes its result to the file named by ``{json}`` in argv), ``variant``
    (it prints a ``VARIANT-RESULT`` line, `bench.train_throughput`), or ``pytest`` (``{json}`` is a JUnit
    XML file)."""

    name: str
    argv: list[str]
    box_s: float
    kind: str = "json"
    skip_reason: str | None = None
    batches: tuple[int, ...] = field(default=())  # `variant` steps: try these batches until one fits


def train_step_argv(patch: int, variant: str, batch: int, dry: bool, count_flops: bool) -> list[str]:
    sizes = (["--arch", "vit_tiny", "--global-size", "32", "--local-size", "16", "--locals", "2",
              "--out-dim", "256", "--steps", "1", "--warmup", "1", "--device", "cpu"] if dry else
             ["--arch", "vit_small", "--steps", "10", "--warmup", "3", "--device", "cuda"])
    return ["-m", "bench.train_throughput", *sizes, "--patch", str(patch), "--batch", str(batch),
            "--run-variant", variant, *(["--count-flops"] if count_flops else [])]


def plan(dry: bool) -> list[Step]:
    """The steps of the check, in order (``dry``: tiny sizes on the CPU)."""
    dry_flag = ["--dry"] if dry else []
    e2e = (["--batch", "4", "--steps", "2", "--warmup", "1"] if dry else ["--batch", "128", "--steps", "20"])
    batches = (4, 2) if dry else S8_BATCHES
    batch16 = 2 if dry else 128
    steps = [Step("environment", ["-m", "bench.gpu_steps", "environment", "--json", "{json}"], 60),
             Step("pytest -m cuda", ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                     "--junitxml", "{json}", str(REPO / "tests")], 150, kind="pytest")]
    for patch in (16, 8):
        for variant in ("baseline", "ours"):
            name = f"train step vit_small/{patch} {variant}"
            argv = train_step_argv(patch, variant, batch16, dry, count_flops=variant == "baseline")
            steps.append(Step(name, argv, 90, kind="variant", batches=(batch16,) if patch == 16 else batches))
    for patch in (16, 8):
        steps.append(Step(f"end-to-end vit_small/{patch}", ["-m", "bench.gpu_steps", "end-to-end", "--json", "{json}",
                                                         "--patch", str(patch), *e2e, *dry_flag], 150))
    steps += [Step("distributed", ["-m", "bench.gpu_steps", "distributed", "--json", "{json}", *dry_flag], 180),
              Step("extraction", ["-m", "bench.gpu_steps", "extraction", "--json", "{json}", *dry_flag], 60),
              Step("faiss", ["-m", "bench.gpu_steps", "faiss", "--json", "{json}", *dry_flag], 90)]
    for patch in (16, 8):
        argv = train_step_argv(patch, "ours-compile", batch16, dry, count_flops=False)
        steps.append(Step(f"train step vit_small/{patch} ours-compile", argv, 180, kind="variant",
                          batches=(batch16,) if patch == 16 else batches,
                          skip_reason=("dry run: compiling takes over a minute on a CPU (tests/test_trainer.py "
                                       "compiles the same trainer)") if dry else None))
    return steps


# ------------------------------------------------------------------ running one step
def run_process(argv: list[str], timeout: float) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr) of ``python *argv`` in a process group of its own,
    which is killed whole when the time is up (torchrun's workers, loader workers)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=max(timeout, 1.0))
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return None, out, err


def junit_summary(path: Path) -> dict:
    """Counts and failing test ids of a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[0][:300] if problem.get("message") else ""
            failing.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failing": failing}


def with_batch(argv: list[str], batch: int) -> list[str]:
    argv = list(argv)
    argv[argv.index("--batch") + 1] = str(batch)
    return argv


def run_step(step: Step, time_left: float, chosen: dict) -> dict:
    """Run ``step`` within ``min(step.box_s, time_left)``; its record: status (ok, failed, timeout, skipped),
    seconds, and the result or the error."""
    record = {"name": step.name, "box_s": step.box_s}
    if step.skip_reason:
        return {**record, "status": "skipped", "seconds": 0.0, "reason": step.skip_reason}
    if time_left < 5:
        return {**record, "status": "skipped", "seconds": 0.0, "reason": "out of time: the check's budget is spent"}
    begin = time.perf_counter()
    deadline = begin + min(step.box_s, time_left)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / ("result.xml" if step.kind == "pytest" else "result.json")
        argv = [str(result_path) if arg == "{json}" else arg for arg in step.argv]
        model = next((word for word in step.name.split() if word.startswith("vit_")), None)
        if model in chosen and "--batch" in argv:  # ViT-S/8's batch, found by its first train-step row
            batches = [chosen[model]]
        else:
            batches = list(step.batches or [None])
        tried = []
        for batch in batches:
            run_argv = with_batch(argv, batch) if batch is not None else argv
            status, out, err = run_process(run_argv, deadline - time.perf_counter())
            record["seconds"] = time.perf_counter() - begin
            if status is None:
                return {**record, "status": "timeout", "error": f"stopped after {record['seconds']:.0f} s "
                        f"(its box: {min(step.box_s, time_left):.0f} s)", "output_tail": (out + err)[-2000:]}
            if step.kind == "variant" and status != 0 and "out of memory" in (out + err).lower() and len(batches) > 1:
                tried.append(batch)
                continue  # the next, smaller batch
            break
        if step.kind == "pytest":
            if not result_path.is_file():
                return {**record, "status": "failed", "error": (out + err)[-3000:]}
            summary = junit_summary(result_path)
            failed = summary["failures"] + summary["errors"] > 0 or status not in (0, 5)
            return {**record, "status": "failed" if failed else "ok", "result": summary,
                    **({"error": (out + err)[-3000:]} if failed else {})}
        if status != 0:
            return {**record, "status": "failed", "error": (err or out)[-3000:], "tried_batches": tried}
        if step.kind == "variant":
            lines = [line for line in out.splitlines() if line.startswith(RESULT_TAG)]
            if not lines:
                return {**record, "status": "failed", "error": "no result line in the output: " + out[-1000:]}
            result = json.loads(lines[-1][len(RESULT_TAG):])
            result.pop("matmul_shapes", None)
            if tried:
                result["too_large_batches"] = tried
            if len(step.batches) > 1:  # the batch found to fit: for the model's later rows and its end-to-end step
                chosen.setdefault(model, result["batch"])
            if result.get("flops_per_image"):
                chosen[f"{model} flops"] = result["flops_per_image"]
            elif chosen.get(f"{model} flops"):  # the same work as the baseline's counted step
                result["flops_from_baseline"] = chosen[f"{model} flops"]
        elif result_path.is_file():
            result = json.loads(result_path.read_text())
        else:
            return {**record, "status": "failed", "error": "the step wrote no result: " + (out + err)[-1000:]}
        failures = result.get("failed")
        return {**record, "status": "failed" if failures else "ok", "result": result,
                **({"error": "; ".join(map(str, failures))} if failures else {})}


def run_steps(steps: list[Step], budget_s: float, progress=print) -> list[dict]:
    """Every step in order, each within its box and the budget left; one progress line per step."""
    start = time.perf_counter()
    chosen: dict[str, int] = {}
    records = []
    for step in steps:
        record = run_step(step, budget_s - (time.perf_counter() - start), chosen)
        records.append(record)
        progress(f"[{time.perf_counter() - start:5.0f} s] {step.name}: {record['status']}"
                 + (f" ({record['seconds']:.0f} s)" if record.get("seconds") else "")
                 + (f": {one_line(record['error'])}" if record.get("error") else "")
                 + (f": {record['reason']}" if record.get("reason") else ""))
    return records


def one_line(text: str, width: int = 160) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error", "Error")) or "Error:" in line]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= width else line[: width - 3] + "..."


# ------------------------------------------------------------------ the report
def figures(record: dict) -> str:
    """The key figures of one step's result, as one table cell."""
    result = record.get("result")
    name = record["name"]
    if result is None:
        return one_line(record.get("error") or record.get("reason") or "")
    if name == "environment":
        return (f"{', '.join(result.get('gpu_names') or ['no GPU'])}; torch {result['torch']}, CUDA {result['cuda']}, "
                f"{result['cpus']} CPUs; FAISS {result.get('faiss')} ({result.get('faiss_gpus', 0)} GPUs); "
                f"nvJPEG {result.get('nvjpeg', 'n/a')}")
    if name.startswith("pytest"):
        text = f"{result['passed']} passed, {result['failures'] + result['errors']} failed, {result['skipped']} skipped"
        return text + ("".join(f"; {item}" for item in result["failing"][:3]))
    if name.startswith("train step"):
        mfu = (result["flops_per_image"] or result.get("flops_from_baseline") or 0) * result["images_per_s"]
        unit, scale = ("TFLOP/s", 1e12) if result["matmul_peak"] >= 1e12 else ("GFLOP/s", 1e9)
        mfu_text = (f", MFU {100 * mfu / result['matmul_peak']:.1f} % of {result['matmul_peak'] / scale:.0f} {unit} "
                    f"({result['dtype']} matmul peak)") if mfu else ""
        compile_text = f", compile + warm-up {result['warmup_s']:.0f} s" if "compile" in name else ""
        return (f"batch {result['batch']}: {result['images_per_s']:.0f} images/s, "
                f"peak {result['peak_memory_gb']:.1f} GB"
                f"{mfu_text}{compile_text}")
    if name.startswith("end-to-end"):
        crops = result.get("crops_ms_per_batch")
        return (f"batch {result['batch']}, {result['workers']} workers, decode {result['decode_on']} / crops "
                f"{result['augment_on']}: {result['images_per_s']:.0f} images/s, waits for data "
                f"{100 * result['data_wait_share']:.0f} % of the time, decode + crops {crops:.1f} ms per batch")
    if name == "distributed":
        runs = "; ".join(f"{run}: {entry['returncode'] == 0 and 'ok' or 'FAILED'}"
                         + (f" (SyncBatchNorm layers {entry['setup']['sync_batchnorm_layers']}, teacher DDP "
                            f"{entry['setup']['ddp_teacher']})" if "setup" in entry else "")
                         for run, entry in result["runs"].items())
        equal = (f"; 2 vs 1 processes: max |teacher diff| {result['two_vs_one_max_abs_diff']:.2e}"
                 if "two_vs_one_max_abs_diff" in result else "")
        return f"{result['processes']} process(es), {result['backend']}: {runs}{equal}"
    if name == "extraction":
        rows = result["rows"]
        return (f"batch {result['batch']}: bf16 {rows['bf16']['images_per_s']:.0f} images/s, fp32 "
                f"{rows['fp32']['images_per_s']:.0f}; cosine bf16 vs fp32 >= {result['bf16_vs_fp32_cosine_min']:.4f}")
    if name == "faiss":
        gpu = result.get("gpu")
        gpu_text = (f"GPU {gpu['queries_per_s']:.0f} queries/s, same neighbours {100 * result['same_neighbours']:.2f} %"
                    if gpu else "no GPU index")
        return (f"{result['database']:,} x {result['dim']}, k {result['k']}: {gpu_text}; CPU "
                f"{result['cpu']['queries_per_s']:.0f} queries/s")
    return ""


def target_lines(records: list[dict]) -> list[str]:
    """The issue's targets against what was measured (reported, never asserted)."""
    by_name = {record["name"]: record for record in records}
    lines = []
    for name, (key, goal) in TARGETS.items():
        value = (by_name.get(name) or {}).get("result", {}).get(key)
        lines.append(f"- {name}: {'n/a' if value is None else f'{value:.0f}'} images/s (target >= {goal:.0f}): "
                     + ("not measured" if value is None else "met" if value >= goal else "NOT met"))
    for patch in (16, 8):
        rows = [(by_name.get(f"train step vit_small/{patch} {variant}") or {}).get("result") for variant in
                ("baseline", "ours")]
        if all(rows):
            ratio = rows[1]["peak_memory_gb"] / rows[0]["peak_memory_gb"]
            lines.append(f"- train step vit_small/{patch} peak memory, ours / baseline: {ratio:.2f} (target <= 1): "
                         + ("met" if ratio <= 1 else "NOT met"))
        for variant in ("ours", "ours-compile"):
            row = (by_name.get(f"train step vit_small/{patch} {variant}") or {}).get("result")
            base = rows[1] if variant == "ours-compile" else rows[0]
            if row and base:
                lines.append(f"- train step vit_small/{patch} {variant} / "
                             f"{'ours' if variant == 'ours-compile' else 'baseline'}: "
                             f"{row['images_per_s'] / base['images_per_s']:.2f}x images/s")
    crops = (by_name.get("end-to-end vit_small/16") or {}).get("result", {}).get("crops_ms_per_batch")
    if crops is not None:
        lines.append(f"- decode + crops on the device per batch: {crops:.1f} ms (above {CROPS_MS_LIMIT:.0f} ms: "
                     "overlap them with the previous step on a side stream)")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# make gpu-check, {report['date']}: {report['device']}", "",
             f"{report['total_s']:.0f} s for the check; environment "
             + (f"built in {report['env_build_s']:.0f} s" if (report.get("env_build_s") or 0) > 10 else "already built")
             + ("; DRY RUN (tiny sizes, CPU)" if report["dry"] else ""), "",
             "| step | status | s | figures |", "|---|---|---|---|"]
    for record in report["steps"]:
        cell = figures(record).replace("|", "/")
        lines.append(f"| {record['name']} | {record['status']} | {record.get('seconds', 0):.0f} | {cell} |")
    lines += ["", "Targets (one H100; benchmarks, not tests):",
              *(["- not judged in a dry run (tiny sizes)"] if report["dry"] else target_lines(report["steps"]))]
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="the CPU dry run: tiny sizes, every step's code path")
    parser.add_argument("--out", default=str(REPO / "results" / "gpu"), help="folder for the JSON and Markdown report")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--env-seconds", type=float, default=None,
                        help="seconds the environment took to build before the check (make gpu-check passes it)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here: make gpu-check measures the GPU path on a machine with one "
                        "(make gpu-check DRY=1 runs its CPU dry run)")
    device = "cpu (dry run)" if args.dry else torch.cuda.get_device_name(0)
    steps = plan(args.dry)
    print(f"make gpu-check on {device}: {len(steps)} steps, budget {args.budget:.0f} s", flush=True)
    start = time.perf_counter()
    records = run_steps(steps, args.budget, progress=lambda line: print(line, flush=True))
    report = {"date": date.today().isoformat(), "device": device, "dry": args.dry, "budget_s": args.budget,
              "total_s": time.perf_counter() - start, "env_build_s": args.env_seconds, "steps": records}
    out = Path(args.out)
    stem = f"{report['date']}-{'dry-cpu' if args.dry else slug(device)}"
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=1, default=str))
    table = markdown(report)
    atomic_write_text(out / f"{stem}.md", table + "\n")
    print(f"\nwritten: {out / stem}.json, .md\n")
    print(table)
    return 0 if all(record["status"] in ("ok", "skipped") and "out of time" not in record.get("reason", "")
                    for record in records) else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
