"""What the side-by-side benches share: the model and crop flags, and one variant run in its own process.

Each variant of a bench (baseline, ours, ...) runs in a fresh Python process
so that its peak memory is its own; it prints one line ``<tag><JSON>`` that
the comparing process reads back (`result_of`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.backbones import VIT_SPECS

REPO = Path(__file__).resolve().parents[1]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--arch --patch --global-size --local-size --locals --out-dim (the paper's ViT-S/16, 2x224 + 10x96, K 65536)."""
    parser.add_argument("--arch", default="vit_small", choices=sorted(VIT_SPECS))
    parser.add_argument("--patch", type=int, default=16, choices=(16, 8))
    parser.add_argument("--global-size", type=int, default=224, help="global crop side (2 per image)")
    parser.add_argument("--local-size", type=int, default=96, help="local crop side")
    parser.add_argument("--locals", type=int, default=10, help="local crops per image (the paper's 10)")
    parser.add_argument("--out-dim", type=int, default=65536, help="head prototypes K")


def result_of(module: str, argv: list[str], variant: str, tag: str, extra: tuple[str, ...] = ()) -> dict:
    """``python -m module *argv --run-variant variant *extra`` in a fresh process; the JSON after its last
    ``tag`` line. RuntimeError (with the child's output on stderr) when it fails."""
    command = [sys.executable, "-m", module, *argv, "--run-variant", variant, *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(tag)]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise RuntimeError(f"the {variant} variant failed (exit status {done.returncode})")
    return json.loads(lines[-1][len(tag):])


def bench_main(argv: list[str] | None, parse_args, run_one, compare, tag: str) -> int:
    """A side-by-side bench's main: with ``--run-variant`` run that variant here (``run_one(args)``) and print
    its ``tag`` line, else ``compare(args, argv)``; torch's intra-op threads are ``args.threads`` meanwhile and
    as they were after (main may run inside another program, e.g. the tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.run_variant:
            print(tag + json.dumps(run_one(args)), flush=True)
        else:
            compare(args, argv)
    finally:
        torch.set_num_threads(threads)
    return 0
