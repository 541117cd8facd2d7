"""analysis.attention: one heatmap and one mask panel per head holding the maps' data, masks placed where the
patches are, 480 x 480 with patch 8, files and folders good and bad, the command line."""
import numpy as np
import PIL.Image
import pytest
import torch
from evaluator_trees import pattern_image, save_image, save_tiny_checkpoint, tiny_vit
from figure_checks import assert_not_blank

from analysis.attention import PNG_DPI, TILE_INCHES, attention_figure, attention_figures, main
from analysis.figures import overlay, plt, save_figure, to_uint8
from common.errors import UserError, run_cli
from evaluate.attention_masks import AttentionMaps, attention_maps, prepare_pair
from pretrain import build_backbone


def panels(fig, kind: str) -> list:
    """The axes labelled '<kind> k' (kind: attention or mask), in head order."""
    found = [axis for axis in fig.axes if axis.get_label().startswith(f"{kind} ")]
    return sorted(found, key=lambda axis: int(axis.get_label().split()[-1]))


def patch_block_mask(cells, grid=4, patch=8) -> np.ndarray:
    """A (grid * patch)^2 bool pixel map, true over the given patch indices (row-major)."""
    flat = np.zeros(grid * grid, bool)
    flat[list(cells)] = True
    return flat.reshape(grid, grid).repeat(patch, 0).repeat(patch, 1)


def hand_made_maps(heads: int) -> tuple[AttentionMaps, list[np.ndarray]]:
    """32 x 32 pattern image, patch 8 (a 4 x 4 grid); head k's mask is patch k and patch 15 - k."""
    pixels, _ = prepare_pair(pattern_image(0, (32, 32)), None, patch_size=8, image_size=32)
    attentions = np.random.default_rng(heads).random((heads, 4, 4)).astype(np.float32)
    cells = [(k % 16, 15 - k % 16) for k in range(heads)]
    patch_masks = np.stack([patch_block_mask(pair, patch=1) for pair in cells])
    return AttentionMaps(attentions, patch_masks, pixels, 8), [patch_block_mask(pair) for pair in cells]


@pytest.mark.parametrize("heads, grid_shape", [(2, (2, 3)), (7, (4, 7))])
def test_one_heatmap_and_one_mask_panel_per_head_holding_the_maps(heads, grid_shape):
    maps, expected_masks = hand_made_maps(heads)
    rgb = to_uint8(maps.image)
    fig = attention_figure(maps, "a title")
    try:
        heatmaps, masks = panels(fig, "attention"), panels(fig, "mask")
        assert [axis.get_title() for axis in heatmaps] == [f"head {k}" for k in range(heads)]
        assert [axis.get_title() for axis in masks] == [f"head {k}" for k in range(heads)]
        assert len(fig.axes) == grid_shape[0] * grid_shape[1]  # 7 heads wrap onto a second row of each kind
        drawn = [axis for axis in fig.axes if axis.images]
        assert len(drawn) == 2 * heads + 2 and all(axis.axison is False for axis in fig.axes)  # blanks stay empty
        for head in range(heads):
            np.testing.assert_array_equal(heatmaps[head].images[0].get_array(), maps.pixel_attentions[head])
            mask_panel = np.asarray(masks[head].images[0].get_array())
            np.testing.assert_array_equal(mask_panel, overlay(rgb, maps.pixel_masks[head]))
            tinted = (mask_panel != rgb).any(axis=-1)  # the pixels the overlay changed: exactly head k's patches
            np.testing.assert_array_equal(tinted, expected_masks[head])
            assert tinted.sum() == 2 * 8 * 8
        union = next(axis for axis in fig.axes if axis.get_label() == "union of masks")
        np.testing.assert_array_equal((np.asarray(union.images[0].get_array()) != rgb).any(axis=-1),
                                      np.any(expected_masks, axis=0))
        image = next(axis for axis in fig.axes if axis.get_label() == "image")
        np.testing.assert_array_equal(image.images[0].get_array(), rgb)
    finally:
        plt.close(fig)


def test_overlay_blends_the_colour_into_masked_pixels_only():
    rgb = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[True, False, False], [False, False, True]])
    out = overlay(rgb, mask, colour=(200, 0, 50), alpha=0.5)
    np.testing.assert_array_equal(out[mask], [[150, 50, 75]] * 2)
    np.testing.assert_array_equal(out[~mask], rgb[~mask])


def test_non_square_image_keeps_its_aspect_with_short_side_resizing():
    maps = attention_maps(tiny_vit(), pattern_image(1, (48, 32)), image_size=32, resize="short-side")
    fig = attention_figure(maps)
    try:
        assert maps.attentions.shape == (2, 4, 6)
        assert [np.shape(axis.images[0].get_array()) for axis in panels(fig, "attention")] == [(32, 48)] * 2
    finally:
        plt.close(fig)


def test_480_pixels_with_patch_8(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit", 8, embed_dim=48, depth=2, num_heads=3, img_size=32).eval()
    maps = attention_maps(model, pattern_image(3, (64, 36)), image_size=480)
    assert maps.attentions.shape == (3, 60, 60)  # 3600 tokens
    totals = maps.attentions.reshape(3, -1).sum(axis=1)
    assert np.all(maps.attentions > 0) and np.all(totals < 1)  # the [CLS] column is left out of each row
    kept = (maps.attentions * maps.patch_masks).reshape(3, -1).sum(axis=1)
    assert np.all(kept >= 0.6 * totals - 1e-6) and np.all(maps.patch_masks.reshape(3, -1).mean(axis=1) < 1)
    fig = attention_figure(maps, "480 px")
    heatmaps, masks = panels(fig, "attention"), panels(fig, "mask")
    assert [np.shape(axis.images[0].get_array()) for axis in heatmaps] == [(480, 480)] * 3
    assert [np.shape(axis.images[0].get_array()) for axis in masks] == [(480, 480, 3)] * 3
    path = save_figure(fig, tmp_path / "high.png", dpi=PNG_DPI)
    assert_not_blank(path)
    with PIL.Image.open(path) as png:
        assert png.width == round(TILE_INCHES * 4 * PNG_DPI)  # image + 3 heads


def write_mixed_inputs(root):
    """A folder with 4 good images (L, P, RGBA, CMYK) and 3 bad ones, a same-stem image elsewhere, an empty folder."""
    folder = root / "images"
    save_image(pattern_image(0).convert("L"), folder / "gray.png")
    save_image(pattern_image(1).convert("P"), folder / "palette.png")
    rgba = pattern_image(2).convert("RGBA")
    rgba.putalpha(128)
    save_image(rgba, folder / "alpha.png")
    pattern_image(3).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "text.jpg").write_text("not an image\n")
    (folder / "zero.jpg").write_bytes(b"")
    big = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    big.save(folder / "whole.jpg", quality=95)
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:3000])
    (folder / "whole.jpg").unlink()
    (folder / "notes.txt").write_text("ignored: not an image extension\n")
    save_image(pattern_image(4), root / "other" / "gray.jpg")
    (root / "empty").mkdir()
    return [folder, root / "other" / "gray.jpg", root / "empty", root / "missing.jpg"]


def test_figures_for_the_good_inputs_and_one_problem_per_bad_one(tmp_path):
    inputs = write_mixed_inputs(tmp_path)
    result = attention_figures(tiny_vit(), inputs, tmp_path / "out", image_size=32, device="cpu", progress=False)
    names = [figure.path.name for figure in result.figures]
    assert names == ["attention_alpha.png", "attention_cmyk.png", "attention_gray.png", "attention_palette.png",
                     "attention_gray_2.png"]
    assert [figure.title for figure in result.figures] == ["alpha.png", "cmyk.jpg", "gray.png", "palette.png",
                                                           "gray.jpg"]
    for figure in result.figures:
        assert figure.path.parent == tmp_path / "out"
        assert "2 heads" in figure.caption and "60%" in figure.caption and "32x32" in figure.caption
        assert_not_blank(figure.path)
    assert len(result.problems) == 5
    for bad in ("text.jpg", "zero.jpg", "truncated.jpg", "'" + str(tmp_path / "empty") + "'", "missing.jpg"):
        assert sum(bad in problem for problem in result.problems) == 1, (bad, result.problems)
    assert all("\n" not in problem for problem in result.problems)
    assert not list((tmp_path / "out").glob(".*"))  # no temp file left behind


@pytest.mark.parametrize("make_input, reason", [
    (lambda root: root / "nowhere", "does not exist"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "holds no image file"),
    (lambda root: (root / "a.jpg").write_text("text") and root / "a.jpg", "cannot decode image"),
])
def test_nothing_drawable_is_a_user_error_naming_the_input(tmp_path, make_input, reason):
    path = make_input(tmp_path)
    with pytest.raises(UserError) as error:
        attention_figures(tiny_vit(), [path], tmp_path / "out", image_size=32, device="cpu", progress=False)
    message = str(error.value)
    assert f"'{path}'" in message and reason in message and "pass image files" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_a_backbone_without_attention_is_a_user_error(tmp_path):
    image = save_image(pattern_image(0), tmp_path / "x.png")
    with pytest.raises(UserError, match="need a ViT backbone, not Conv2d"):
        attention_figures(torch.nn.Conv2d(3, 8, 3), [image], tmp_path / "out", progress=False)


def test_command_line(tmp_path, monkeypatch, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tinyrun" / "checkpoint.pth")
    good = save_image(pattern_image(5), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    monkeypatch.chdir(tmp_path)
    common = ["--ckpt", str(checkpoint), "--image-size", "32", "--device", "cpu", "--no-progress"]

    assert run_cli(main, common + ["--images", str(good), str(bad)]) == 1  # drawn, but an input was skipped
    out, err = capsys.readouterr()
    written = tmp_path / "results" / "tinyrun" / "attention" / "attention_good.png"  # default --out
    assert_not_blank(written)
    lines = out.splitlines()
    assert lines[0] == f"wrote {written.relative_to(tmp_path)}" and len(lines) == 2
    assert lines[1].startswith("skipped: cannot decode image") and "bad.jpg" in lines[1]
    assert err == ""
    assert run_cli(main, common + ["--images", str(good)]) == 0
    capsys.readouterr()

    assert run_cli(main, common + ["--images", str(bad), "--out", str(tmp_path / "none")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: no attention figure drawn from")
    assert str(bad) in err and not (tmp_path / "none").exists()
