"""What reliability costs: a step checkpoint of the full training state, and the collapse monitors.

    python -m bench.reliability_overhead [--config vit_small16] [--batch 4] [--steps 3]

* checkpoint: seconds to write the trainer's whole state (student, teacher,
  AdamW moments, center, RNG) with `save_training_checkpoint` (atomic temp
  file + fsync + rename + hard link + rotation), its size and rate, and the
  overhead per step at ``--save-every-steps`` 500 on the measured step time;
* collapse monitors: the DINO loss on outputs of the step's shapes with the
  monitors (teacher entropy, KL, batch entropy, read back to the host)
  against without, ``--loss-reps`` times each, alternated (a whole step is too
  noisy for a difference this small); the trainer computes them only at log
  steps (every 10 by default), so the run pays the difference / 10.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from pretrain.checkpoint_files import rotating_path, save_training_checkpoint

from .train_throughput import CONFIGS, bench_trainer, random_crops, synchronize


def timed(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_small16", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=4, help="images per step (the CPU default keeps it short)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps with and without monitors (each)")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--loss-reps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=500)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench_trainer(tmp, device, args.steps + 2, **CONFIGS[args.config])
        crops = random_crops(trainer, args.batch)
        trainer.train_step(crops, epoch=1, it=0)  # warm-up; creates the AdamW moments
        step_s = statistics.median(timed(lambda it=it: trainer.train_step(crops, 1, 1 + it).loss.item(), device)
                                   for it in range(args.steps))
        cfg, loss_fn = trainer.cfg, trainer.model.loss_fn
        student = torch.randn(len(crops) * args.batch, cfg.out_dim, device=device)
        teacher = torch.randn(2 * args.batch, cfg.out_dim, device=device)
        plain, monitored = [], []
        for _ in range(args.loss_reps):
            plain.append(timed(lambda: loss_fn(student, teacher, 1).item(), device))
            monitored.append(timed(lambda: [value.item() for value in
                                            loss_fn.with_monitors(student, teacher, 1)[1].values()], device))
        extra_s = statistics.median(monitored) - statistics.median(plain)

        state = trainer.checkpoint_state(1, 0)
        saves = [timed(lambda it=it: save_training_checkpoint(state, trainer.output_dir, it, keep=2), device)
                 for it in range(1, args.saves + 1)]
        size_gb = rotating_path(trainer.output_dir, args.saves).stat().st_size / 2**30
    save_s = statistics.median(saves)
    print(f"device {device.type}, config {args.config}, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"train step                     {step_s:8.2f} s")
    print(f"collapse monitors, per log step {extra_s:+8.4f} s ({100 * extra_s / step_s:+.2f} % of a step); "
          f"every {args.log_every} steps: {100 * extra_s / step_s / args.log_every:+.3f} % of training time")
    print(f"step checkpoint                {save_s:8.2f} s for {size_gb:.2f} GiB ({size_gb / save_s:.2f} GiB/s); "
          f"every {args.save_every} steps: {100 * save_s / (step_s * args.save_every):.3f} % of training time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
