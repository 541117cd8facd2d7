"""bench.train_throughput: the baseline and our path do the same work, the FLOP count is right, the table prints."""
import re
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

import pretrain.trainer as trainer_module
from bench import train_throughput as bench
from pretrain.backbones import build_backbone
from pretrain.head import DINOHead, MultiCropWrapper

CPU = torch.device("cpu")
# a tiny ViT (width 32, 2 heads, 2 blocks, 8-px patches) with drop-path on, so both variants also
# draw the same random numbers; 2 global crops of 32 px and 2 local crops of 16 px
TINY = dict(preset="vanilla", arch="vit", embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32,
            drop_path_rate=0.1, out_dim=64, hidden_dim=48, bottleneck_dim=16, global_crops_size=32,
            local_crops_size=16, local_crops_number=2, precision="fp32")


def two_steps(variant: str):
    """Losses and final student/teacher weights after 2 steps of ``variant`` on the same seed and crops."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench.bench_trainer(tmp, CPU, 4, **TINY)
        crops = bench.random_crops(trainer, 3, torch.Generator().manual_seed(1))
        # Adam divides by sqrt(v) + eps: with eps 1e-8, the gradients whose true value is 0 (the key bias:
        # softmax ignores a per-row shift) are rounding noise scaled up to +-lr; a larger eps keeps the
        # update a smooth function of the gradient, so that two equal computations give equal weights
        for group in trainer.optimizer.param_groups:
            group["eps"] = 1e-3
        torch.manual_seed(2)
        with bench.variant_context(trainer, variant):
            losses = [trainer.train_step(crops, epoch=1, it=it) for it in range(2)]
        fused = [layer.fused_attn for layer in bench.attention_layers(trainer.student, trainer.teacher)]
        grads = {name: param.grad for name, param in trainer.student.named_parameters() if param.grad is not None}
        return (torch.stack(losses), trainer.student.state_dict(), trainer.teacher.state_dict(), grads,
                fused, [group["foreach"] for group in trainer.optimizer.param_groups])


def test_baseline_and_ours_compute_the_same_step(tmp_path):
    ema, clip = trainer_module.ema_update, trainer_module.clip_gradients_per_parameter
    base_loss, base_student, base_teacher, base_grads, base_fused, base_foreach = two_steps("baseline")
    ours_loss, ours_student, ours_teacher, ours_grads, ours_fused, _ = two_steps("ours")
    # the baseline's swaps are undone when it ends
    assert (trainer_module.ema_update, trainer_module.clip_gradients_per_parameter) == (ema, clip)
    assert base_fused == ours_fused and all(ours_fused) and len(ours_fused) == 2 * TINY["depth"]
    assert base_foreach == [None, None]

    torch.testing.assert_close(base_loss, ours_loss, rtol=1e-5, atol=1e-6)
    assert base_grads.keys() == ours_grads.keys() and len(ours_grads) > 30
    for name in base_grads:  # the second step's gradients, after clipping (norms up to ~1000 before)
        torch.testing.assert_close(base_grads[name], ours_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert base_student.keys() == ours_student.keys()
    for name in base_student:
        torch.testing.assert_close(base_student[name], ours_student[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(base_teacher[name], ours_teacher[name], rtol=1e-5, atol=1e-6, msg=name)
    # the steps did move the weights (lr 5e-4): equal because computed alike, not because untouched
    initial = bench.bench_trainer(str(tmp_path), CPU, 4, **TINY).student.state_dict()
    moved = (ours_student["backbone.blocks.0.attn.qkv.weight"] - initial["backbone.blocks.0.attn.qkv.weight"])
    assert moved.abs().max() > 1e-4


def test_baseline_path_is_the_official_one_inside_the_context():
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench.bench_trainer(tmp, CPU, 2, **TINY)
        with bench.official_choices(trainer):
            layers = bench.attention_layers(trainer.student, trainer.teacher)
            assert layers and not any(layer.fused_attn for layer in layers)
            assert all(group["foreach"] is False and group["fused"] is False
                       for group in trainer.optimizer.param_groups)
            assert trainer_module.ema_update is bench.ema_per_parameter
            assert trainer_module.clip_gradients_per_parameter is bench.clip_per_parameter
        assert all(layer.fused_attn for layer in layers)
        assert all(group["fused"] for group in trainer.optimizer.param_groups)  # ours: fused AdamW


def hand_vit_forward_flops(side, patch, dim, depth, heads, batch):
    """2 FLOPs per multiply-add of every matmul in a ViT forward, written out per layer."""
    n = (side // patch) ** 2  # patches
    t = n + 1  # tokens with [CLS]
    head_dim = dim // heads
    patch_embed = 2 * n * (3 * patch * patch) * dim  # the strided conv: a (n, 3p^2) @ (3p^2, D) matmul
    qkv = 2 * t * dim * (3 * dim)
    scores = 2 * heads * t * head_dim * t  # Q K^T per head
    mix = 2 * heads * t * t * head_dim  # A V per head
    proj = 2 * t * dim * dim
    mlp = 2 * t * dim * (4 * dim) + 2 * t * (4 * dim) * dim
    return batch * (patch_embed + depth * (qkv + scores + mix + proj + mlp))


def test_flop_counter_matches_the_hand_formula_for_a_vit_forward():
    side, patch, dim, depth, heads, batch = 32, 8, 48, 3, 3, 2
    hidden, bottleneck, prototypes = 64, 16, 40
    model = MultiCropWrapper(build_backbone("vit", patch, embed_dim=dim, depth=depth, num_heads=heads, img_size=side),
                             DINOHead(dim, prototypes, hidden, bottleneck))
    images = torch.randn(batch, 3, side, side)
    with torch.no_grad(), bench.explicit_attention(model), FlopCounterMode(display=False) as counter:
        model(images)
    head = 2 * batch * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * prototypes)
    expected = hand_vit_forward_flops(side, patch, dim, depth, heads, batch) + head
    assert abs(counter.get_total_flops() - expected) <= 0.03 * expected
    # the bench's own estimate (its formula for the ViT forward) agrees with the hand one
    assert bench.vit_forward_flops(side, patch, dim, depth) == hand_vit_forward_flops(side, patch, dim, depth, heads, 1)


def test_counted_train_step_is_teacher_forward_plus_three_student_forwards():
    """A whole step counted = the estimate the bench prints beside it (teacher forward + 3 x student
    forward) less the image gradient of the patch embedding, which backward does not compute."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench.bench_trainer(tmp, CPU, 2, **TINY)
        batch = 2
        counted = bench.count_step_flops(trainer, bench.random_crops(trainer, batch)) / batch
        estimate = bench.estimated_step_flops_per_image(trainer.cfg)
    cfg = trainer.cfg
    patch_embed = [2 * (side // cfg.patch_size) ** 2 * 3 * cfg.patch_size ** 2 * cfg.embed_dim
                   for side in [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number]
    assert abs(counted - (estimate - sum(patch_embed))) <= 0.005 * estimate
    assert sum(patch_embed) > 0.02 * estimate  # (large enough in this tiny ViT to be seen)


def test_main_prints_both_rows_and_the_ratio(capsys):
    threads = torch.get_num_threads()
    assert bench.main(["--arch", "vit_tiny", "--patch", "16", "--global-size", "32", "--local-size", "16",
                       "--locals", "1", "--out-dim", "64", "--batch", "2", "--steps", "1", "--warmup", "0",
                       "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    number = r"\s+[\d.]+"
    for variant in ("baseline", "ours"):
        assert re.search(rf"^{variant}\s+float32" + 6 * number + r"\s*$", out, re.M), out
    assert re.search(r"^ours / baseline: \d+\.\d\dx images/s", out, re.M), out
    assert "GFLOP/img counted on one step" in out and "matmul peak (float32 2048^3" in out
    assert torch.get_num_threads() == threads
