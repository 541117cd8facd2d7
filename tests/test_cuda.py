"""The GPU path against the CPU path or fp32 (marked ``cuda``: skipped without a GPU, run by make gpu-check).

Other ``cuda`` cases live beside their CPU twins: nvJPEG against libjpeg (test_device_decode.py) and the
batched crops on the GPU against the CPU (test_batch_augment.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_runs import tiny_cfg

from pretrain import build_backbone
from pretrain.distributed import DistInfo, free_port
from pretrain.trainer import Trainer

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def one_step(cfg, crops) -> tuple[float, torch.Tensor]:
    """(loss, the student's flattened weight change) of one step of a fresh trainer on ``crops``."""
    torch.manual_seed(0)
    trainer = Trainer(cfg, DistInfo(device=CUDA))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.student.parameters()])
    loss = trainer.train_step([crop.clone() for crop in crops], epoch=1, it=5).loss.item()
    after = torch.cat([p.detach().flatten() for p in trainer.model.student.parameters()])
    return loss, (after - before).float()


def test_bf16_step_close_to_the_fp32_step(tiny_suite, tmp_path):
    """The same step under bf16 autocast and in fp32: losses within 2 %, weight updates pointing the same way."""
    settings = dict(augment_on="loader", warmup_epochs=0, freeze_last_layer=0)
    generator = torch.Generator().manual_seed(0)
    fp32 = tiny_cfg(tiny_suite / "train", tmp_path / "a", precision="fp32", **settings)
    bf16 = tiny_cfg(tiny_suite / "train", tmp_path / "b", precision="bf16", **settings)
    sizes = [fp32.global_crops_size] * 2 + [fp32.local_crops_size] * fp32.local_crops_number
    crops = [torch.randn(8, 3, size, size, generator=generator) for size in sizes]
    loss32, update32 = one_step(fp32, crops)
    loss16, update16 = one_step(bf16, crops)
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert F.cosine_similarity(update16, update32, dim=0).item() > 0.95


def test_bf16_features_close_to_fp32():
    from evaluate.features import FeatureExtractor, FeatureSpec
    torch.manual_seed(0)
    model = build_backbone("vit_small", 16)
    images = torch.randn(16, 3, 224, 224)
    bf16 = FeatureExtractor(model, device=CUDA, batch_size=16, num_workers=0, progress=False)
    fp32 = FeatureExtractor(model, device=CUDA, batch_size=16, num_workers=0, progress=False, fp32=True)
    assert bf16.autocast_dtype == torch.bfloat16 and fp32.autocast_dtype is None
    a, b = bf16.batch(images, FeatureSpec("cls")).float(), fp32.batch(images, FeatureSpec("cls")).float()
    assert F.cosine_similarity(a, b, dim=1).min().item() > 0.99


def test_faiss_gpu_neighbours_equal_the_cpu_ones():
    import faiss

    from evaluate.knn import faiss_neighbours
    assert hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, \
        "this FAISS build has no GPU support: install the faiss-gpu wheel of pyproject.toml"
    generator = torch.Generator().manual_seed(0)
    database = F.normalize(torch.randn(50_000, 384, generator=generator), dim=1)
    queries = F.normalize(torch.randn(200, 384, generator=generator), dim=1)
    gpu_sims, gpu_index = faiss_neighbours(database, queries, 20, use_gpu=True)
    cpu_sims, cpu_index = faiss_neighbours(database, queries, 20, use_gpu=False)
    assert torch.allclose(gpu_sims, cpu_sims, atol=1e-4)
    assert (gpu_index == cpu_index).float().mean().item() > 0.99  # ties may swap


def test_syncbatchnorm_and_ddp_under_a_one_process_nccl_group(tiny_suite, tmp_path):
    """What a one-GPU torchrun run builds (as the official code): DDP student and teacher, SyncBatchNorm in
    the head; two steps train and the checkpoint keeps the official 'module.' layout."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        cfg = tiny_cfg(tiny_suite / "train", tmp_path / "run", use_bn_in_head=True, max_steps=2)
        trainer = Trainer(cfg, DistInfo(device=CUDA, group=True))
        record = trainer.setup_record()
        assert record["distributed"] and record["ddp_student"] and record["ddp_teacher"]
        assert record["sync_batchnorm_layers"] == 2  # the head's two hidden BatchNorms
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.teacher.modules()) == 2
        summary = trainer.fit()
        assert summary["iterations"] == 2
        from pretrain.checkpoint import safe_load
        saved = safe_load(tmp_path / "run" / "checkpoint.pth")
        assert all(key.startswith("module.") for key in saved["teacher"])
    finally:
        dist.destroy_process_group()
