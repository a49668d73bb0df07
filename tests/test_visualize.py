"""Preview pictures: sizes and colours by hand."""
import numpy as np

from lightning_clipes.visualize import colour_mask, heatmap, label_panel, pad_to_common_size


def test_heatmap_endpoints_and_clipping():
    hm = heatmap(np.array([[0.0, 1.0, -3.0, np.nan]]))
    assert hm[0, 0].tolist() == [20, 20, 90] and hm[0, 1].tolist() == [255, 240, 80]
    assert hm[0, 2].tolist() == [20, 20, 90] and hm[0, 3].tolist() == [20, 20, 90]


def test_colour_mask_keeps_background_pixels_of_the_image():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [15, 255]], np.uint8)
    plain = colour_mask(mask)
    assert plain[0, 1].tolist() == [128, 0, 0] and plain[1, 0].tolist() == [192, 128, 128]
    over = colour_mask(mask, image, alpha=0.5)
    assert over[0, 0].tolist() == [100, 100, 100] and over[0, 1].tolist() == [114, 50, 50]


def test_label_panel_has_one_tile_per_view():
    image = np.zeros((30, 60, 3), np.uint8)
    cams = np.zeros((2, 30, 60), np.float32)
    mask = np.zeros((30, 60), np.uint8)
    assert label_panel(image, cams, mask, height=20).size == (3 * 40 + 2 * 4, 20)
    assert label_panel(image, cams, mask, mask, height=20).size == (4 * 40 + 3 * 4, 20)


def test_pictures_are_padded_to_one_size_for_wandb():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    b = np.zeros((4, 1, 3), np.uint8)
    pa, pb = pad_to_common_size([a, b])
    assert pa.shape == pb.shape == (4, 3, 3)
    np.testing.assert_array_equal(pa[:2], a)
    assert (pa[2:] == 255).all() and (pb[:, 1:] == 255).all() and (pb[:, :1] == 0).all()
