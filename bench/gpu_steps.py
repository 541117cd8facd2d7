"""The measurements of `make gpu-check` (`bench.gpu_check`) that the other benches do not make, one per call:

    python -m bench.gpu_steps environment  --json FILE
    python -m bench.gpu_steps end-to-end   --json FILE [--patch 16] [--batch 128] [--steps 20] [--dry]
    python -m bench.gpu_steps distributed  --json FILE [--dry]
    python -m bench.gpu_steps extraction   --json FILE [--dry]
    python -m bench.gpu_steps faiss        --json FILE [--dry]

Each writes one JSON object to ``FILE`` (the orchestrator runs each in its own process, under its own time
limit). ``--dry`` shrinks every size so that the same code runs on a CPU in seconds (``make gpu-check DRY=1``,
part of ``make test``).

* **environment**: the GPU(s), driver, CUDA, torch, torchvision and FAISS versions, CPU count, whether nvJPEG
  decodes and FAISS has GPU support.
* **end-to-end**: a pretraining step measured from files: ImageNet-like JPEGs written here (sides around
  500x375, a few CMYK JPEGs, PNGs and truncated files among them), read through the trainer's own loader
  with a worker per CPU core, decoded and cropped where the trainer decides (nvJPEG and batched crops on
  CUDA), then the train step of the paper's ViT-S settings. Reports images/s over the timed steps, the share
  of wall time the step waited for the loader, and what the device-side decode + crops cost per batch.
* **distributed**: ``torchrun`` with NCCL (gloo on a CPU) around ``python -m pretrain.train``: a few steps of
  the demo preset (a BatchNorm head: DDP, SyncBatchNorm on CUDA) and of ViT-S/16, with one process per GPU
  (one process on one GPU still forms a process group, so DDP and SyncBatchNorm run); with two GPUs or
  more, two processes against one at the same global batch (fp32), teacher weights compared.
* **extraction**: [CLS] extraction at batch 256 (224 px), bf16 autocast against fp32, images/s, and the
  cosine between the two features.
* **faiss**: exact inner-product k-NN (k = 20) over 1M x 384 L2-normalised features, FAISS on the GPU
  against FAISS on the CPU (fewer queries, rated per query), with the neighbours compared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.augment_throughput import photo_like
from bench.train_throughput import synchronize
from bench.variant_process import REPO
from common.atomic import atomic_write_text
from evaluate.features import default_device
from pretrain.checkpoint import safe_load, strip_prefixes
from pretrain.config import config_flags, resolve
from pretrain.distributed import DistInfo, free_port
from pretrain.presets import PRESETS
from pretrain.trainer import Trainer, peak_memory_gb


# ------------------------------------------------------------------ environment
def environment(args: argparse.Namespace) -> dict:
    import torchvision
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "gpus": torch.cuda.device_count(),
            "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = query.stdout.strip().splitlines()
    try:
        import faiss
        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError as error:
        info["faiss"] = f"not importable: {error}"
    if torch.cuda.is_available():
        import io

        from torchvision.io import decode_jpeg
        buffer = io.BytesIO()
        photo_like(np.random.default_rng(0), 64, 48).save(buffer, format="JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        info["nvjpeg"] = tuple(decode_jpeg(data, device="cuda").shape) == (3, 48, 64)
    return info


# ------------------------------------------------------------------ end to end from files
def imagenet_like_file(index: int, folder: Path, rng: np.random.Generator) -> str:
    """One file of an ImageNet-like folder; returns its kind. Sides around 500x375 (the ImageNet average),
    portrait and square ones among them; 1 in 40 a CMYK JPEG, 1 in 40 a PNG, 1 in 200 truncated (the first
    of each kind among the first 8 files, so a small folder holds them all)."""
    width = int(np.clip(rng.normal(500, 90), 160, 900))
    aspect = rng.choice([0.75, 0.75, 0.75, 1.0, 1.33])
    height = int(np.clip(width * aspect, 120, 900))
    image = photo_like(rng, width, height)
    stem = folder / f"{index:06d}"
    if index % 200 == 7:
        path = stem.with_suffix(".jpg")
        image.save(path, quality=90)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])  # truncated: the trainer skips it and logs it
        return "truncated"
    if index % 40 == 3:
        image.convert("CMYK").save(stem.with_suffix(".jpg"), quality=90)
        return "cmyk"
    if index % 40 == 5:
        image.save(stem.with_suffix(".png"))
        return "png"
    image.save(stem.with_suffix(".jpg"), quality=90)
    return "jpeg"


def _write_share(job) -> list[str]:
    folder, indices = job
    rng = np.random.default_rng(indices[0] if indices else 0)
    return [imagenet_like_file(index, Path(folder), rng) for index in indices]


def write_imagenet_like(root: Path, count: int, unique: int, workers: int) -> dict:
    """``count`` files in ``root/n00000000``: ``unique`` distinct ones written by ``workers`` processes,
    hard-linked round to ``count`` (the kinds repeat with them). Returns the count of each kind."""
    import multiprocessing
    folder = root / "n00000000"
    folder.mkdir(parents=True, exist_ok=True)
    unique = min(unique, count)
    shares = [(str(folder), list(range(start, unique, max(workers, 1)))) for start in range(max(workers, 1))]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_write_share, shares)
    else:
        results = [_write_share(share) for share in shares]
    kinds: dict[str, int] = {}
    for share_kinds in results:
        for kind in share_kinds:
            kinds[kind] = kinds.get(kind, 0) + 1
    kinds["hard_links"] = count - unique  # to the distinct files, round
    files = sorted(folder.iterdir())
    for index in range(unique, count):
        source = files[index % unique]
        os.link(source, folder / f"{index:06d}{source.suffix}")
    return kinds


def end_to_end(args: argparse.Namespace) -> dict:
    device = default_device()
    workers = args.workers or (os.cpu_count() or 1)
    sizes = (dict(arch="vit_tiny", global_crops_size=32, local_crops_size=16, local_crops_number=2, out_dim=256)
             if args.dry else dict(arch="vit_small"))
    batch = args.batch
    count = batch * (args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        kinds = write_imagenet_like(Path(tmp) / "data", count, unique=min(count, 48 if args.dry else 1024),
                                    workers=min(workers, 16))
        written = time.perf_counter() - start
        cfg = resolve("vanilla", **{**PRESETS["paper"], **sizes, "patch_size": args.patch, "data": f"{tmp}/data",
                                    "output_dir": f"{tmp}/run", "batch_size_per_gpu": batch, "num_workers": workers,
                                    "max_bad_fraction": 0.2 if args.dry else 0.05, "epochs": 1, "warmup_epochs": 0})
        Path(cfg.output_dir).mkdir()  # the bad-image log goes there (`Trainer.fit` makes it in a run)
        trainer = Trainer(cfg, DistInfo(device=device))
        crops_seconds = []
        make_crops = trainer.crops_on

        def timed_crops(crops, target):
            synchronize(device)
            begin = time.perf_counter()
            made = make_crops(crops, target)
            synchronize(device)
            crops_seconds.append(time.perf_counter() - begin)
            return made
        trainer.crops_on = timed_crops
        trainer.sampler.set_epoch(0, 0, batch)
        loader = iter(trainer.make_loader())
        waits, totals = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for it in range(args.warmup + args.steps):
            begin = time.perf_counter()
            crops = next(loader)
            got = time.perf_counter()
            trainer.train_step(crops, epoch=0, it=it)
            synchronize(device)
            end = time.perf_counter()
            if it >= args.warmup:
                waits.append(got - begin)
                totals.append(end - begin)
        timed_crops_s = crops_seconds[args.warmup:]
        return {"arch": f"{cfg.arch}/{cfg.patch_size}", "crops": f"2x{cfg.global_crops_size}+"
                f"{cfg.local_crops_number}x{cfg.local_crops_size}", "batch": batch, "workers": workers,
                "augment_on": trainer.augment_on, "decode_on": trainer.decode_on, "files": count, "kinds": kinds,
                "files_written_s": written, "steps": args.steps, "images_per_s": batch * len(totals) / sum(totals),
                "data_wait_share": sum(waits) / sum(totals),
                "crops_ms_per_batch": 1000 * float(np.mean(timed_crops_s)) if timed_crops_s else None,
                "bad_images_skipped": len(trainer.images.bad_files()) + len(trainer.images.skipped),
                "peak_memory_gb": peak_memory_gb(device)}


# ------------------------------------------------------------------ distributed
def torchrun(processes: int, train_args: list[str], timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "pretrain.train", *train_args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_record(folder: Path) -> dict:
    """The setup record and the last step of a run's log.jsonl."""
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    setup = next(record for record in records if record["kind"] == "setup")
    steps = [record for record in records if record["kind"] == "step"]
    return {"setup": setup, "steps": len(steps), "last_loss": steps[-1]["loss"] if steps else None}


def distributed(args: argparse.Namespace) -> dict:
    from data.suite_classification import write_classification
    gpus = torch.cuda.device_count()
    processes = 2 if gpus >= 2 else 1
    timeout = 240.0
    result: dict = {"processes": processes, "backend": "nccl" if gpus else "gloo", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_classification(tmp, n_train_per_class=8 if args.dry else 40, n_val_per_class=1, image_size=32,
                             progress=False)
        suite = f"{tmp}/classification/train"
        write_imagenet_like(Path(tmp) / "jpegs", 64 if args.dry else 512, unique=16 if args.dry else 128,
                            workers=min(os.cpu_count() or 1, 8))
        vit_s16 = (dict(global_crops_size=32, local_crops_size=16, local_crops_number=2, out_dim=256)
                   if args.dry else {})
        runs = {
            "demo": (["--preset", "demo"], dict(data=suite, batch_size_per_gpu=8 if args.dry else 32, max_steps=4,
                                                 knn_every=0, log_every_steps=1)),
            "vit_small16": (["--preset", "paper"], dict(data=f"{tmp}/jpegs", batch_size_per_gpu=4 if args.dry else 32,
                                                         max_steps=3, log_every_steps=1, num_workers=2,
                                                         max_bad_fraction=0.2,
                                                         **vit_s16)),
        }
        for name, (preset, settings) in runs.items():
            out = Path(tmp) / name
            begin = time.perf_counter()
            done = torchrun(processes, [*preset, *config_flags({**settings, "output_dir": out})], timeout)
            entry = {"seconds": time.perf_counter() - begin, "returncode": done.returncode}
            if done.returncode == 0:
                entry.update(run_record(out))
            else:
                entry["error"] = done.stderr[-3000:]
            result["runs"][name] = entry
        if processes == 2:  # two processes equal one at the same global batch (fp32, the demo preset)
            teachers = {}
            for count, batch in ((1, 16), (2, 8)):
                out = Path(tmp) / f"equal{count}"
                settings = dict(data=suite, batch_size_per_gpu=batch, max_steps=3, knn_every=0, precision="fp32",
                                output_dir=out)
                done = torchrun(count, ["--preset", "demo", *config_flags(settings)], timeout)
                if done.returncode:
                    result["equal_error"] = done.stderr[-3000:]
                    break
                teachers[count] = strip_prefixes(safe_load(out / "checkpoint.pth")["teacher"])
            if len(teachers) == 2:
                result["two_vs_one_max_abs_diff"] = max(
                    (teachers[1][name].float() - teachers[2][name].float()).abs().max().item()
                    for name in teachers[1] if teachers[1][name].is_floating_point())
    failed = [name for name, entry in result["runs"].items() if entry["returncode"]]
    if failed or "equal_error" in result:
        result["failed"] = failed + (["two-vs-one"] if "equal_error" in result else [])
    return result


# ------------------------------------------------------------------ extraction and FAISS
def extraction(args: argparse.Namespace) -> dict:
    from evaluate.features import FeatureExtractor, FeatureSpec
    from pretrain import build_backbone
    device = default_device()
    batch = 4 if args.dry else 256
    side = 32 if args.dry else 224
    torch.manual_seed(0)
    model = build_backbone("vit_small", 16).eval().to(device)
    images = torch.randn(batch, 3, side, side)
    rows = {}
    features = {}
    for name, fp32 in (("bf16", False), ("fp32", True)):
        extractor = FeatureExtractor(model, batch_size=batch, num_workers=0, progress=False, device=device,
                                     fp32=fp32)
        spec = FeatureSpec("cls")
        features[name] = extractor.batch(images, spec).float().cpu()  # warm-up, and the features compared
        repeats = 2 if args.dry else 10
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(repeats):
            extractor.batch(images, spec)
        synchronize(device)
        rows[name] = {"images_per_s": batch * repeats / (time.perf_counter() - begin),
                      "autocast": str(extractor.autocast_dtype)}
    cosine = F.cosine_similarity(features["bf16"], features["fp32"], dim=1)
    return {"batch": batch, "side": side, "device": str(device), "rows": rows,
            "bf16_vs_fp32_cosine_min": cosine.min().item(), "bf16_vs_fp32_cosine_mean": cosine.mean().item()}


def faiss_step(args: argparse.Namespace) -> dict:
    import faiss

    from evaluate.knn import faiss_neighbours
    size, dim, k = (10_000, 384, 20) if args.dry else (1_000_000, 384, 20)
    queries_gpu, queries_cpu = (100, 100) if args.dry else (10_000, 1_000)
    generator = torch.Generator().manual_seed(0)
    database = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
    queries = F.normalize(torch.randn(queries_gpu, dim, generator=generator), dim=1)
    gpu = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    result = {"database": size, "dim": dim, "k": k, "faiss_gpu": gpu}
    begin = time.perf_counter()
    cpu_sims, cpu_index = faiss_neighbours(database, queries[:queries_cpu], k, use_gpu=False)
    cpu_s = time.perf_counter() - begin
    result["cpu"] = {"queries": queries_cpu, "seconds": cpu_s, "queries_per_s": queries_cpu / cpu_s}
    if gpu:
        faiss_neighbours(database[:1000], queries[:10], k, use_gpu=True)  # warm-up: GPU resources
        begin = time.perf_counter()
        gpu_sims, gpu_index = faiss_neighbours(database, queries, k, use_gpu=True)
        gpu_s = time.perf_counter() - begin
        result["gpu"] = {"queries": queries_gpu, "seconds": gpu_s, "queries_per_s": queries_gpu / gpu_s}
        same = (gpu_index[:queries_cpu].sort(1).values == cpu_index.sort(1).values).float().mean().item()
        result["same_neighbours"] = same
        result["max_similarity_diff"] = (gpu_sims[:queries_cpu] - cpu_sims).abs().max().item()
    elif torch.cuda.is_available():
        result["failed"] = ["this FAISS build has no GPU support (faiss.get_num_gpus() == 0)"]
    return result


STEP_FUNCTIONS = {"environment": environment, "end-to-end": end_to_end, "distributed": distributed,
                  "extraction": extraction, "faiss": faiss_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEP_FUNCTIONS)
    parser.add_argument("--json", required=True, help="where to write the step's result")
    parser.add_argument("--dry", action="store_true", help="tiny sizes, any device (make gpu-check DRY=1)")
    parser.add_argument("--patch", type=int, default=16, help="end-to-end: ViT-S patch")
    parser.add_argument("--batch", type=int, default=128, help="end-to-end: images per step")
    parser.add_argument("--steps", type=int, default=20, help="end-to-end: timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="end-to-end: untimed steps first")
    parser.add_argument("--workers", type=int, default=None, help="end-to-end: loader workers (default: CPUs)")
    args = parser.parse_args(argv)
    result = STEP_FUNCTIONS[args.step](args)
    atomic_write_text(args.json, json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
