"""comparison_grid / error_heatmap against references computed here from the input tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mouserecon.figures import comparison_grid, error_heatmap, grid_layout


def _to_u8(x: torch.Tensor) -> np.ndarray:
    """[3, h, w] in [0, 1] -> uint8 [h, w, 3], rounded half up (float32, as the plain grid always did)."""
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * np.float32(255) + np.float32(0.5)).astype(np.uint8)


def _reference_heatmap(pred: torch.Tensor, gt: torch.Tensor, max_error: float) -> torch.Tensor:
    """Piecewise-linear black -> red -> yellow -> white, written out channel by channel."""
    e = ((pred - gt).abs().mean(0) / max_error).clamp(0, 1)  # [h, w]
    r = torch.clamp(e * 3, 0, 1)
    g = torch.clamp(e * 3 - 1, 0, 1)
    b = torch.clamp(e * 3 - 2, 0, 1)
    return torch.stack([r, g, b])


def _reference_grid(gt: torch.Tensor, preds: list[torch.Tensor], with_error: bool, max_error: float = 0.5):
    rows = []
    for v in range(gt.shape[0]):
        tiles = [_to_u8(gt[v])]
        for p in preds:
            tiles.append(_to_u8(p[v]))
            if with_error:
                tiles.append(_to_u8(_reference_heatmap(p[v], gt[v], max_error)))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def _inputs(v=3, h=64, w=64, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(v, 3, h, w, generator=g)
    preds = [(gt + 0.2 * torch.randn(v, 3, h, w, generator=g)).clamp(0, 1) for _ in range(n)]
    return gt, preds


@pytest.mark.parametrize("with_error", [True, False])
@pytest.mark.parametrize("hw", [(64, 64), (20, 48)])
def test_plain_grid_is_the_concatenation(with_error, hw):
    gt, preds = _inputs(h=hw[0], w=hw[1])
    out = comparison_grid(gt, preds, with_error=with_error)
    ref = _reference_grid(gt, preds, with_error)
    ncols = 1 + len(preds) * (2 if with_error else 1)
    assert out.dtype == np.uint8 and out.shape == (3 * hw[0], ncols * hw[1], 3)
    assert out.tobytes() == ref.tobytes()


def test_plain_grid_unchanged_by_new_defaults():
    gt, preds = _inputs()
    a = comparison_grid(gt, preds)
    b = comparison_grid(gt, preds, True, model_names=None, row_labels=None, max_error=0.5)
    assert a.tobytes() == b.tobytes()


def test_error_heatmap_colours():
    gt = torch.zeros(3, 1, 3)
    pred = torch.tensor([0.0, 0.25, 0.5]).expand(3, 1, 3)  # 0, max_error / 2, max_error (max_error = 0.5)
    hm = error_heatmap(pred, gt, max_error=0.5)[:, 0].T  # [3 pixels, RGB]
    assert torch.allclose(hm[0], torch.tensor([0.0, 0.0, 0.0]))  # black
    assert torch.allclose(hm[1], torch.tensor([1.0, 0.5, 0.0]))  # half: orange, between red and yellow
    assert torch.allclose(hm[2], torch.tensor([1.0, 1.0, 1.0]))  # white
    beyond = error_heatmap(torch.ones(3, 1, 1), torch.zeros(3, 1, 1), max_error=0.5)
    assert torch.allclose(beyond.flatten(), torch.ones(3))  # clamped at white above max_error
    # other scales: max_error is the white point
    hm2 = error_heatmap(torch.full((3, 1, 1), 0.1), torch.zeros(3, 1, 1), max_error=0.1)
    assert torch.allclose(hm2.flatten(), torch.ones(3))


@pytest.mark.parametrize("hw", [(64, 64), (20, 48), (128, 160)])
def test_labelled_grid_tiles_are_upscaled_plain_grid(hw):
    h, w = hw
    gt, preds = _inputs(h=h, w=w)
    plain = comparison_grid(gt, preds)
    out = comparison_grid(gt, preds, model_names=["ours", "baseline"],
                          row_labels=["mouse_003 view 5", "mouse_003 view 6", "mouse_003 view 7"])
    lay = grid_layout(h, w)
    s = lay.scale
    assert s == max(1, -(-96 // w), -(-32 // h)) and lay.tile_w == s * w >= 96 and lay.tile_h == s * h
    assert out.dtype == np.uint8
    assert out.shape == (lay.header + plain.shape[0] * s, lay.left + plain.shape[1] * s, 3)
    up = plain.repeat(s, axis=0).repeat(s, axis=1)
    np.testing.assert_array_equal(out[lay.header:, lay.left:], up)
    header, left = out[: lay.header], out[lay.header:, : lay.left]
    assert (header < 128).any() and (left < 128).any()  # dark text was drawn
    assert (header == 255).mean() > 0.5 and (left == 255).mean() > 0.5  # on a white background


def test_header_text_per_column():
    gt, preds = _inputs()
    lay = grid_layout(64, 64)
    a = comparison_grid(gt, preds, model_names=["ours", "baseline"], row_labels=["a", "b", "c"])
    b = comparison_grid(gt, preds, model_names=["ours", "something else"], row_labels=["a", "b", "c"])
    col = lambda img, c: img[: lay.header, lay.left + c * lay.tile_w : lay.left + (c + 1) * lay.tile_w]
    # columns: GT | ours | err | model 2 | err; only the 4th header cell differs
    for c in (0, 1, 2, 4):
        np.testing.assert_array_equal(col(a, c), col(b, c))
    assert not np.array_equal(col(a, 3), col(b, 3))
    for c in range(5):
        assert (col(a, c) < 128).any()  # every column has a title
    # the error-column headers carry a colour bar: saturated red/yellow pixels exist there, none in GT's
    def coloured(cell):
        r, g, bl = (cell[..., i].astype(int) for i in range(3))
        return ((r - bl) > 100).any()
    assert coloured(col(a, 2)) and coloured(col(a, 4)) and not coloured(col(a, 0))
    # row labels differ -> left band differs, tiles and header do not
    c = comparison_grid(gt, preds, model_names=["ours", "baseline"], row_labels=["a", "b", "mouse_999 view 9"])
    np.testing.assert_array_equal(a[: lay.header], c[: lay.header])
    assert not np.array_equal(a[:, : lay.left], c[:, : lay.left])


def test_error_scale_in_header_follows_max_error():
    gt, preds = _inputs(n=1)
    lay = grid_layout(64, 64)
    a = comparison_grid(gt, preds, model_names=["m"], max_error=0.5)
    b = comparison_grid(gt, preds, model_names=["m"], max_error=0.2)
    err_header = lambda img: img[: lay.header, lay.left + 2 * lay.tile_w :]
    assert not np.array_equal(err_header(a), err_header(b))
    np.testing.assert_array_equal(b[lay.header:, lay.left:],
                                  comparison_grid(gt, preds, max_error=0.2).repeat(2, 0).repeat(2, 1))


def test_only_one_kind_of_label_and_long_text_keep_layout():
    gt, preds = _inputs()
    lay = grid_layout(64, 64)
    long = "x" * 200 + " a very long model name with many words that cannot fit in a tile header"
    for kwargs in ({"model_names": ["a", long]}, {"row_labels": ["v0", "v1", long]}):
        out = comparison_grid(gt, preds, **kwargs)
        assert out.shape == (lay.header + 3 * 128, lay.left + 5 * 128, 3)
        plain = comparison_grid(gt, preds)
        np.testing.assert_array_equal(out[lay.header:, lay.left:], plain.repeat(2, 0).repeat(2, 1))
        assert (out[: lay.header] < 128).any() and (out[lay.header:, : lay.left] < 128).any()


def test_without_error_columns():
    gt, preds = _inputs()
    lay = grid_layout(64, 64)
    out = comparison_grid(gt, preds, with_error=False, model_names=["a", "b"])
    assert out.shape == (lay.header + 3 * 128, lay.left + 3 * 128, 3)


def test_mismatched_label_counts_raise():
    gt, preds = _inputs()
    with pytest.raises(ValueError, match="model_names"):
        comparison_grid(gt, preds, model_names=["only one"])
    with pytest.raises(ValueError, match="row_labels"):
        comparison_grid(gt, preds, row_labels=["a", "b"])
