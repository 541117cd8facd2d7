"""bench.train_throughput: the baseline and our path do the same work, the FLOP count is right, the table prints."""
import re
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

import pretrain.dino as dino_module
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
        for group in trainer.model.optimizer.param_groups:
            group["eps"] = 1e-3
        torch.manual_seed(2)
        with bench.variant_context(trainer, variant):
            losses = [trainer.train_step(crops, epoch=1, it=it).loss for it in range(2)]
        fused = [layer.fused_attn for layer in bench.attention_layers(trainer.model.student, trainer.model.teacher)]
        grads = {name: param.grad for name, param in trainer.model.student.named_parameters() if param.grad is not None}
        return (torch.stack(losses), trainer.model.student.state_dict(), trainer.model.teacher.state_dict(), grads,
                fused, [group["foreach"] for group in trainer.model.optimizer.param_groups])


def test_baseline_and_ours_compute_the_same_step(tmp_path):
    ema, clip = dino_module.ema_update, dino_module.clip_gradients_per_parameter
    base_loss, base_student, base_teacher, base_grads, base_fused, base_foreach = two_steps("baseline")
    ours_loss, ours_student, ours_teacher, ours_grads, ours_fused, _ = two_steps("ours")
    # the baseline's swaps are undone when it ends
    assert (dino_module.ema_update, dino_module.clip_gradients_per_parameter) == (ema, clip)
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
    initial = bench.bench_trainer(str(tmp_path), CPU, 4, **TINY).model.student.state_dict()
    moved = (ours_student["backbone.blocks.0.attn.qkv.weight"] - initial["backbone.blocks.0.attn.qkv.weight"])
    assert moved.abs().max() > 1e-4


def test_baseline_path_is_the_official_one_inside_the_context():
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench.bench_trainer(tmp, CPU, 2, **TINY)
        with bench.official_choices(trainer):
            layers = bench.attention_layers(trainer.model.student, trainer.model.teacher)
            assert layers and not any(layer.fused_attn for layer in layers)
            assert all(group["foreach"] is False and group["fused"] is False
                       for group in trainer.model.optimizer.param_groups)
            assert dino_module.ema_update is bench.ema_per_parameter
            assert dino_module.clip_gradients_per_parameter is bench.clip_per_parameter
            last_layers = [trainer.model.student.head.last_layer, trainer.model.teacher.head.last_layer]
            assert all(layer.forward.__func__ is bench.weight_side_forward for layer in last_layers)
        assert all(layer.fused_attn for layer in layers)
        assert all("forward" not in vars(layer) for layer in last_layers)  # ours: the class's output-side form
        assert all(group["fused"] for group in trainer.model.optimizer.param_groups)  # ours: fused AdamW


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
        assert re.search(rf"^{variant}\s+float32" + 7 * number + r"\s*$", out, re.M), out
    assert re.search(r"^ours / baseline: \d+\.\d\dx images/s", out, re.M), out
    assert re.search(r"^the step's own matmuls \(\d+ mm/addmm/bmm calls of \d+ shapes.*float32 [\d.]+ GFLOP/s",
                     out, re.M)
    assert "GFLOP/img counted on one step" in out and "matmul peak (float32 2048^3" in out
    assert torch.get_num_threads() == threads


# ------------------------------------------------------------------ the head's weight-normalised last layer
def reference_weight_norm_linear(x, v, g):
    """The weight-side form (the official ``nn.utils.weight_norm``): F.linear(x, g * v / ||v||)."""
    return torch.nn.functional.linear(x, v * (g / v.norm(dim=1, keepdim=True)))


def test_weight_norm_linear_matches_the_weight_side_form_and_its_gradients():
    """The head's output-side weight norm (one matmul, the scale on the logits, a hand-written backward)
    equals the official weight-side form in value and in every gradient, gain frozen or trained."""
    from pretrain.head import WeightNormLinear, _WeightNormLinearFunction

    torch.manual_seed(0)
    for gain_trained in (False, True):
        layer = WeightNormLinear(16, 300)
        with torch.no_grad():
            layer.weight_g.uniform_(0.5, 2.0)
        layer.weight_g.requires_grad = gain_trained
        x = torch.nn.functional.normalize(torch.randn(7, 16), dim=-1).requires_grad_()
        upstream = torch.randn(7, 300)
        ours = layer(x)
        ours.backward(upstream)
        got = [x.grad, layer.weight_v.grad, layer.weight_g.grad]
        x2 = x.detach().clone().requires_grad_()
        v2 = layer.weight_v.detach().clone().requires_grad_()
        g2 = layer.weight_g.detach().clone().requires_grad_(gain_trained)
        expected = reference_weight_norm_linear(x2, v2, g2)
        expected.backward(upstream)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.weight(), v2 * (g2 / v2.norm(dim=1, keepdim=True)))
        for name, mine, theirs in zip(("x", "v", "g"), got, [x2.grad, v2.grad, g2.grad]):
            if theirs is None:
                assert mine is None, name
            else:
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
    # in float64 the hand-written backward passes autograd's finite-difference check
    inputs = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(6, 5, dtype=torch.float64, requires_grad=True),
              (torch.rand(6, 1, dtype=torch.float64) + 0.5).requires_grad_())
    assert torch.autograd.gradcheck(_WeightNormLinearFunction.apply, inputs)


def test_weight_norm_linear_under_bf16_autocast_is_close_to_the_weight_side_form():
    """Under autocast the matmuls run in bf16 (as F.linear's would): value and gradients within bf16 rounding."""
    from pretrain.head import WeightNormLinear

    torch.manual_seed(1)
    layer = WeightNormLinear(32, 200)
    x = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1).requires_grad_()
    upstream = torch.randn(6, 200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer(x)
    ours.float().backward(upstream)
    assert ours.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert layer.weight_v.grad.dtype == torch.float32
    x2 = x.detach().clone().requires_grad_()
    v2 = layer.weight_v.detach().clone().requires_grad_()
    expected = reference_weight_norm_linear(x2, v2, layer.weight_g.detach())
    expected.backward(upstream)
    torch.testing.assert_close(ours.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(layer.weight_v.grad, v2.grad, rtol=3e-2, atol=3e-2)


def test_recorded_matmul_shapes_are_the_counted_matmuls_and_replay():
    """The shapes the bench replays as its second reference are exactly the step's counted matmuls."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = bench.bench_trainer(tmp, CPU, 2, **TINY)
        crops = bench.random_crops(trainer, 2)
        shapes = bench.MatmulShapes()
        with bench.explicit_attention(trainer.model.student, trainer.model.teacher), \
                FlopCounterMode(display=False) as counter, \
                shapes:
            trainer.train_step(crops, epoch=1, it=0)
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    counted = sum(flops for op, flops in by_op.items() if op.split(".")[-1] in ("mm", "addmm", "bmm", "baddbmm"))
    recorded = sum(2 * batch * m * k * n * count for (_, batch, m, k, n, _), count in shapes.counts.items())
    assert recorded == counted > 0
    names = {key[0] for key in shapes.counts}
    assert {"mm", "addmm", "bmm"} <= names  # linear layers, their backward, explicit attention
    assert "nt" in {key[-1] for key in shapes.counts}  # x @ W^T: the weight is read transposed
    assert bench.matmul_shapes_rate(shapes.counts, CPU, torch.float32, repeats=1) > 0
