"""DAVIS label propagation: the math against a per-pixel reference, the protocol's details, end to end."""
import json
import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import shared_data_dir
from evaluator_trees import save_tiny_checkpoint, tiny_vit

import evaluate.video_segmentation as video
from common.errors import run_cli
from data.davis import davis_palette
from data.index_masks import read_index_mask, write_index_mask
from evaluate.label_propagation import (
    ContextQueue,
    full_fp32_matmuls,
    min_max_normalise_channels,
    one_hot_patch_labels,
    propagate_labels,
)
from evaluate.video_segmentation import PropagationOptions, load_frame, resized_frame_size, run_video_segmentation
from pretrain import build_backbone


def reference_propagation(target, contexts, labels, grid, radius, topk, temperature):
    """Straight from the protocol text, one target pixel at a time, in float64."""
    target = target / np.linalg.norm(target, axis=1, keepdims=True)
    contexts = contexts / np.linalg.norm(contexts, axis=2, keepdims=True)
    rows, cols = grid
    result = np.zeros((rows * cols, labels.shape[2]))
    for i in range(rows * cols):
        candidates = []  # (weight, label vector) for every allowed (context frame, source pixel)
        for c in range(len(contexts)):
            for j in range(rows * cols):
                if radius is None or (abs(i // cols - j // cols) <= radius and abs(i % cols - j % cols) <= radius):
                    candidates.append((math.exp(target[i] @ contexts[c, j] / temperature), labels[c, j]))
        threshold = sorted((w for w, _ in candidates), reverse=True)[min(topk, len(candidates)) - 1]
        kept = [(w, y) for w, y in candidates if w >= threshold]
        result[i] = sum(w * y for w, y in kept) / sum(w for w, _ in kept)
    return result


@pytest.mark.parametrize("radius", [2, None])
def test_batched_propagation_equals_per_pixel_reference(radius):
    rng = np.random.default_rng(0)
    grid, n_contexts, dim, classes = (6, 5), 3, 16, 3
    target = rng.normal(size=(30, dim))
    contexts = rng.normal(size=(n_contexts, 30, dim))
    labels = rng.dirichlet(np.ones(classes), size=(n_contexts, 30))  # soft labels, as recent frames carry
    expected = reference_propagation(target, contexts, labels, grid, radius, topk=5, temperature=0.1)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    batched = propagate_labels(as_tensor(target), as_tensor(contexts), as_tensor(labels), grid, radius, 5, 0.1)
    assert np.allclose(batched.numpy(), expected, atol=1e-5)
    chunked = propagate_labels(as_tensor(target), as_tensor(contexts), as_tensor(labels), grid, radius, 5, 0.1,
                               max_affinity_elements=50)  # one target row per chunk
    assert torch.allclose(chunked, batched, atol=1e-6)
    if radius is not None:  # the restriction matters on this grid
        unrestricted = reference_propagation(target, contexts, labels, grid, None, 5, 0.1)
        assert not np.allclose(unrestricted, expected, atol=1e-3)


def test_top_k_is_joint_over_contexts_and_keeps_ties():
    # target = e0; context 0 holds e0 at pixel 0 (similarity 1), context 1 holds e0 at pixels 0 and 1
    features = torch.eye(4)[[1, 2, 3, 1]]
    target = torch.eye(4)[[0, 1, 2, 3]]
    first, second = features.clone(), features.clone()
    first[0] = torch.eye(4)[0]
    second[0], second[1] = torch.eye(4)[0], torch.eye(4)[0]
    labels = torch.tensor([[[1.0, 0.0]] * 4, [[0.0, 1.0]] * 4])
    soft = propagate_labels(target, torch.stack([first, second]), labels, (2, 2), None, topk=2)
    # pixel 0: three sources tie at exp(10) and all are kept (top-2 over both frames, ties kept)
    assert soft[0].tolist() == pytest.approx([1 / 3, 2 / 3])


def test_context_queue_keeps_first_and_last_n_frames():
    queue = ContextQueue(torch.zeros(2, 3), torch.zeros(2, 1), n_last=3)
    for frame in range(1, 10):
        queue.push(frame, torch.full((2, 3), float(frame)), torch.full((2, 1), float(frame)))
        if frame == 2:
            assert queue.frame_ids() == [0, 1, 2]
    assert queue.frame_ids() == [0, 7, 8, 9]
    assert queue.features()[:, 0, 0].tolist() == [0, 7, 8, 9] and queue.labels().shape == (4, 2, 1)
    only_first = ContextQueue(torch.zeros(2, 3), torch.zeros(2, 1), n_last=0)
    only_first.push(1, torch.ones(2, 3), torch.ones(2, 1))
    assert only_first.frame_ids() == [0]


class IdentityFeatures(torch.nn.Module):
    """A 'ViT' whose patch tokens are the standard basis: patch i has feature e_i in every frame."""
    patch_size = 8

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def get_intermediate_layers(self, x, n=1):
        n_patches = (x.shape[-2] // 8) * (x.shape[-1] // 8)
        return [torch.cat([torch.zeros(1, n_patches), torch.eye(n_patches)])[None]]


def write_davis_tree(root, sequences, size=(64, 32), n_frames=5, seed=0, identical=False):
    """A DAVIS-layout tree; each sequence: noise frames, each annotated with two full-height stripes.

    Stripes 16 px wide starting at multiples of 8 are patch-aligned for p = 8 and
    have no corners, which bilinear upsampling + argmax would round off even
    for perfectly propagated patch labels.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    labels = np.zeros((height, width), np.uint8)
    labels[:, :16] = 1
    labels[:, 32:48] = 2
    for sequence in sequences:
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for t in range(n_frames):
            frame = frame if identical else rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            os.makedirs(root / "JPEGImages" / "480p" / sequence, exist_ok=True)
            PIL.Image.fromarray(frame).save(root / "JPEGImages" / "480p" / sequence / f"{t:05d}.jpg", quality=95)
            write_index_mask(root / "Annotations" / "480p" / sequence / f"{t:05d}.png", labels)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{s}\n" for s in sequences))
    return labels


def test_identical_frames_propagate_the_first_mask_unchanged(tmp_path):
    labels = write_davis_tree(tmp_path / "davis", ["still"], size=(64, 32), n_frames=6, identical=True)
    scores = run_video_segmentation(IdentityFeatures(), tmp_path / "davis", tmp_path / "out",
                                    options=PropagationOptions(frame_height=32), progress=False)
    assert scores["J&F_mean"] == 100.0 and scores["J_mean"] == 100.0 and scores["F_mean"] == 100.0
    for t in range(6):
        assert np.array_equal(read_index_mask(tmp_path / "out" / "still" / f"{t:05d}.png"), labels)


def test_each_frame_sees_the_first_frame_and_the_last_n(tmp_path, monkeypatch):
    write_davis_tree(tmp_path / "davis", ["walk"], n_frames=7)
    seen = []

    def recording(target, context_features, context_labels, grid, *args):
        seen.append(len(context_features))
        assert torch.equal(context_labels[0], one_hot_patch_labels(first, grid))  # the first frame, hard labels
        return propagate_labels(target, context_features, context_labels, grid, *args)

    first = read_index_mask(tmp_path / "davis" / "Annotations" / "480p" / "walk" / "00000.png")
    monkeypatch.setattr(video, "propagate_labels", recording)
    paths = sorted((tmp_path / "davis" / "JPEGImages" / "480p" / "walk").iterdir())
    model = tiny_vit()
    with torch.no_grad():
        list(video.propagate_sequence(model, paths, first, PropagationOptions(frame_height=32, n_last_frames=3)))
    assert seen == [1, 2, 3, 4, 4, 4]


def test_frame_resize_rule_and_normalisation(tmp_path):
    assert resized_frame_size(854, 480) == (832, 480)
    assert resized_frame_size(480, 854) == (480, 832)  # portrait: width 480, height floored
    assert resized_frame_size(1920, 1080) == (832, 480)
    assert resized_frame_size(480, 480) == (448, 480)  # square counts as landscape
    assert resized_frame_size(128, 72, short_side=72) == (128, 72)  # the suite's frames at their own size
    assert resized_frame_size(128, 72, short_side=64, side_multiple=16) == (112, 64)
    path = tmp_path / "frame.png"
    PIL.Image.new("RGB", (854, 480), (200, 100, 50)).save(path)
    frame, original = load_frame(path, PropagationOptions())
    assert frame.shape == (3, 480, 832) and original == (854, 480)
    expected = [(200 / 255 - 0.485) / 0.228, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225]
    assert frame[:, 10, 10].tolist() == pytest.approx(expected, abs=1e-6)  # RGB order, std 0.228


def test_labels_in_and_out():
    label_map = np.zeros((16, 32), np.uint8)
    label_map[:8, :8], label_map[8:, 24:] = 2, 255  # void counts as background
    one_hot = one_hot_patch_labels(label_map, (2, 4))
    assert one_hot.shape == (8, 3) and one_hot.argmax(1).tolist() == [2, 0, 0, 0, 0, 0, 0, 0]
    maps = torch.stack([torch.full((2, 2), 0.5), torch.tensor([[0.0, 0.2], [0.4, 0.6]]), torch.zeros(2, 2)])
    normalised = min_max_normalise_channels(maps)
    assert normalised[0].tolist() == [[1, 1], [1, 1]] and normalised[2].tolist() == [[0, 0], [0, 0]]
    assert normalised[1].flatten().tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_tf32_is_disabled_inside_and_restored_after():
    matmul = torch.backends.cuda.matmul
    attribute = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, attribute)
    with pytest.raises(RuntimeError), full_fp32_matmuls():
        assert getattr(matmul, attribute) in ("ieee", False)
        raise RuntimeError("restored even after an error")
    assert getattr(matmul, attribute) == before


def test_end_to_end_cli_skip_subset_and_settings(tmp_path, monkeypatch, capsys):
    write_davis_tree(tmp_path / "davis", ["alpha", "beta"], size=(70, 40), n_frames=4)
    ckpt = str(save_tiny_checkpoint(tmp_path / "tiny.pth"))
    out = tmp_path / "pred"
    argv = ["--ckpt", ckpt, "--davis", str(tmp_path / "davis"), "--output", str(out), "--frame-height", "32",
            "--side-multiple", "8", "--json", str(tmp_path / "scores.json")]
    assert run_cli(video.main, argv) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) >= {"J&F_mean", "J_mean", "F_mean"} and 0 <= scores["J&F_mean"] <= 100
    assert scores["J&F_mean"] == pytest.approx((scores["J_mean"] + scores["F_mean"]) / 2)
    for t in range(4):  # palette PNGs at the original 70x40, first frame = GT
        with PIL.Image.open(out / "alpha" / f"{t:05d}.png") as png:
            assert png.mode == "P" and png.size == (70, 40)
            assert np.array_equal(np.array(png.getpalette()).reshape(-1, 3)[:4], davis_palette()[:4])
            assert np.array(png).max() <= 2
    gt = read_index_mask(tmp_path / "davis" / "Annotations" / "480p" / "alpha" / "00000.png")
    assert np.array_equal(read_index_mask(out / "alpha" / "00000.png"), gt)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete sequence was recomputed")

    with monkeypatch.context() as patch:  # complete outputs: nothing recomputed, same scores
        patch.setattr(video, "write_sequence", must_not_run)
        assert run_cli(video.main, argv) == 0
    assert json.loads((tmp_path / "scores.json").read_text()) == scores
    assert run_cli(video.main, argv + ["--topk", "3"]) == 2  # other settings, same folder
    assert "other settings (topk)" in capsys.readouterr().err
    assert run_cli(video.main, argv + ["--topk", "3", "--force", "--sequences", "beta"]) == 0
    assert not (out / "alpha").exists() and (out / "beta").is_dir()  # stale alpha deleted, beta alone scored


def test_interrupted_run_keeps_complete_sequences_only(tmp_path, monkeypatch):
    write_davis_tree(tmp_path / "davis", ["alpha", "beta"], n_frames=4)
    model = tiny_vit()
    options, out = PropagationOptions(frame_height=32), tmp_path / "pred"
    original = video.propagate_sequence

    def interrupted_in_beta(model, frame_paths, *args, **kwargs):
        for index, prediction in enumerate(original(model, frame_paths, *args, **kwargs)):
            if "beta" in str(frame_paths[0]) and index == 1:
                raise KeyboardInterrupt
            yield prediction

    monkeypatch.setattr(video, "propagate_sequence", interrupted_in_beta)
    with pytest.raises(KeyboardInterrupt):
        run_video_segmentation(model, tmp_path / "davis", out, options=options, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "settings.json"]  # no half-written beta
    monkeypatch.setattr(video, "propagate_sequence", original)
    alpha_time = (out / "alpha" / "00003.png").stat().st_mtime_ns
    run_video_segmentation(model, tmp_path / "davis", out, options=options, progress=False)
    assert (out / "alpha" / "00003.png").stat().st_mtime_ns == alpha_time and len(list((out / "beta").iterdir())) == 4


def one_error_line(capsys) -> str:
    """The one 'error: ...' line on stderr (progress-bar lines aside), with no traceback."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("davis")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_inputs_end_in_one_line_and_write_nothing(tmp_path, capsys):
    root, out = tmp_path / "davis", tmp_path / "pred"
    write_davis_tree(root, ["alpha"], n_frames=4)
    ckpt = str(save_tiny_checkpoint(tmp_path / "tiny.pth"))
    argv = ["--ckpt", ckpt, "--davis", str(root), "--output", str(out), "--frame-height", "32"]
    write_index_mask(root / "Annotations" / "480p" / "alpha" / "00000.png", np.zeros((16, 16), np.uint8))
    assert run_cli(video.main, argv) == 2
    assert "00000.png' is 16x16" in one_error_line(capsys) and not out.exists()
    write_davis_tree(root, ["alpha"], n_frames=4)
    assert run_cli(video.main, argv + ["--split", "test"]) == 2
    assert "test.txt" in one_error_line(capsys) and not out.exists()
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\nghost\n")
    assert run_cli(video.main, argv) == 2
    assert "'ghost'" in one_error_line(capsys) and not out.exists()
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\n")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    assert run_cli(video.main, ["--ckpt", str(tmp_path / "broken.pth")] + argv[2:]) == 2
    assert "broken.pth" in one_error_line(capsys) and not out.exists()
    (root / "JPEGImages" / "480p" / "alpha" / "00002.jpg").write_bytes(b"\xff\xd8 truncated")
    assert run_cli(video.main, argv) == 2
    assert "00002.jpg" in one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["settings.json"]  # no sequence, no staging folder
    assert run_cli(video.main, argv + ["--frame-height", "30"]) == 2
    assert "multiple of the patch size 8" in one_error_line(capsys)


def test_real_davis_sample(tmp_path):
    shared = shared_data_dir()
    source = shared / "davis_mini" if shared else None
    if source is None or not (source / "ImageSets" / "2017" / "val.txt").is_file():
        pytest.skip("real DAVIS sample (../shared/data/davis_mini) not present")
    sequence = (source / "ImageSets" / "2017" / "val.txt").read_text().split()[0]
    root = tmp_path / "davis"
    for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        (root / kind / "480p" / sequence).mkdir(parents=True)
        for t in range(4):  # a short piece of the real sequence
            name = f"{t:05d}.{ext}"
            (root / kind / "480p" / sequence / name).symlink_to(source / kind / "480p" / sequence / name)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text(sequence + "\n")
    torch.manual_seed(0)
    model = build_backbone("vit", 16, embed_dim=32, depth=2, num_heads=2, img_size=32)
    scores = run_video_segmentation(model, root, tmp_path / "pred", options=PropagationOptions(frame_height=160),
                                    progress=False)
    assert 0 <= scores["J&F_mean"] <= 100
    with PIL.Image.open(tmp_path / "pred" / sequence / "00003.png") as png:
        assert png.mode == "P" and png.size == (854, 480)  # the real frames' size


def test_generated_suite_end_to_end(tmp_path):
    suite_davis = pytest.importorskip("data.suite_davis")
    suite_davis.write_davis(tmp_path, n_val_sequences=2, n_train_sequences=0, n_frames=4, progress=False)
    model = tiny_vit()
    scores = run_video_segmentation(model, tmp_path / "davis", tmp_path / "pred",
                                    options=PropagationOptions(frame_height=72), progress=False)
    assert 0 <= scores["J&F_mean"] <= 100
    sequence = next(p for p in (tmp_path / "pred").iterdir() if p.is_dir())
    with PIL.Image.open(sequence / "00001.png") as png:
        assert png.mode == "P" and png.size == (128, 72)
