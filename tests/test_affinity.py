"""CAA pieces against hand-made cases and literal loops (method §4)."""
import numpy as np
import pytest
import torch

from lightning_clipes.components.affinity import box_mask, refine_cams, sinkhorn_affinity


def literal_sinkhorn(a: np.ndarray, rounds: int = 3) -> np.ndarray:
    a = a.astype(np.float64).copy()
    n = a.shape[0]
    for _ in range(rounds):
        for j in range(n):
            a[:, j] /= a[:, j].sum()
        for i in range(n):
            a[i, :] /= a[i, :].sum()
    s = (a + a.T) / 2
    out = np.zeros_like(s)
    for i in range(n):
        for j in range(n):
            out[i, j] = sum(s[i, k] * s[k, j] for k in range(n))
    return out


def test_sinkhorn_hand_made_2x2():
    # [[1, 2], [3, 4]]: columns /(4, 6) -> rows -> ... computed by hand for one round:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c = np.array([[1 / 4, 2 / 6], [3 / 4, 4 / 6]])
    r = c / c.sum(1, keepdims=True)
    s = (r + r.T) / 2
    np.testing.assert_allclose(sinkhorn_affinity(a, rounds=1).numpy(), s @ s, rtol=1e-6)


def test_sinkhorn_matches_literal_loop_and_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.random((7, 7)).astype(np.float32) + 0.01
    got = sinkhorn_affinity(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, literal_sinkhorn(a), rtol=1e-5)
    np.testing.assert_allclose(got, got.T, rtol=1e-6)
    # a doubly-stochastic symmetric matrix squared stays doubly stochastic, up to the last round's error
    assert np.allclose(got.sum(0), 1, atol=1e-2)


def test_sinkhorn_batched_equals_single():
    a = torch.rand(3, 5, 5) + 0.1
    batched = sinkhorn_affinity(a)
    for i in range(3):
        torch.testing.assert_close(batched[i], sinkhorn_affinity(a[i]))


def cam_from_u8(u8):
    """cams whose floor(cam*255) equals the given integers exactly."""
    return (np.asarray(u8, dtype=np.float32) + 0.5) / 255


def test_box_single_blob_inside():
    cam = np.zeros((6, 7), np.float32)
    cam[1:3, 2:5] = 1.0
    expected = np.zeros((6, 7), bool)
    expected[1:3, 2:5] = True
    np.testing.assert_array_equal(box_mask(cam, 0.4), expected)


def test_box_touching_right_and_bottom_edges_loses_last_row_and_column():
    cam = np.zeros((5, 6), np.float32)
    cam[2:5, 3:6] = 1.0  # blob reaches the bottom-right corner
    expected = np.zeros((5, 6), bool)
    expected[2:4, 3:5] = True  # rows 2..3, cols 3..4: the edge row and column are dropped
    np.testing.assert_array_equal(box_mask(cam, 0.4), expected)


def test_box_touching_left_and_top_edges_keeps_them():
    cam = np.zeros((5, 6), np.float32)
    cam[0:2, 0:3] = 1.0
    expected = np.zeros((5, 6), bool)
    expected[0:2, 0:3] = True
    np.testing.assert_array_equal(box_mask(cam, 0.4), expected)


def test_box_ring_with_hole_and_blob_inside_the_hole():
    # an outer ring (with an inner contour) and a separate blob in its hole: the union is the ring's box
    cam = np.zeros((9, 9), np.float32)
    cam[1:8, 1:8] = 1.0
    cam[2:7, 2:7] = 0.0
    cam[4, 4] = 1.0
    expected = np.zeros((9, 9), bool)
    expected[1:8, 1:8] = True
    np.testing.assert_array_equal(box_mask(cam, 0.4), expected)


def test_box_diagonal_pixels_are_one_blob():
    # 8-connectivity: two diagonal pixels form one blob, whose box covers the 2x2 square
    cam = np.zeros((5, 5), np.float32)
    cam[1, 1] = cam[2, 2] = 1.0
    expected = np.zeros((5, 5), bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(box_mask(cam, 0.4), expected)


def test_box_two_separate_blobs():
    cam = np.zeros((6, 10), np.float32)
    cam[1, 1:3] = 1.0
    cam[3:5, 6:8] = 1.0
    expected = np.zeros((6, 10), bool)
    expected[1, 1:3] = True
    expected[3:5, 6:8] = True
    np.testing.assert_array_equal(box_mask(cam, 0.4), expected)


def test_box_threshold_is_strictly_greater_than_int_fraction_of_u8_max():
    # u8 max 200 -> thr = int(0.4*200) = 80: 80 is out, 81 is in
    u8 = np.array([[200, 80, 0, 81, 0]])
    u8 = np.vstack([u8, np.zeros_like(u8), np.zeros_like(u8)])
    got = box_mask(cam_from_u8(u8), 0.4)
    assert got[0, 0] and not got[0, 1] and got[0, 3]


def test_box_empty_when_cam_is_flat_or_zero():
    assert not box_mask(np.zeros((4, 4), np.float32), 0.4).any()
    # all pixels equal: u8 = thr only if ... a constant 0.3 cam: u8 76, thr 30 -> all above -> whole-grid blob
    flat = np.full((4, 4), 0.3, np.float32)
    expected = np.zeros((4, 4), bool)
    expected[0:3, 0:3] = True
    np.testing.assert_array_equal(box_mask(flat, 0.4), expected)


def test_box_one_pixel_grid_is_empty():
    assert not box_mask(np.ones((1, 1), np.float32), 0.4).any()


def test_box_matches_opencv_on_random_maps():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for trial in range(200):
        h, w = rng.integers(1, 12, size=2)
        cam = (rng.random((h, w)) ** 3).astype(np.float32)
        u8 = (cam * 255).astype(np.uint8)
        _, binary = cv2.threshold(u8[:, :, None], int(0.4 * u8.max()), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        expected = np.zeros((h, w), bool)
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            expected[y : min(y + bh, h - 1), x : min(x + bw, w - 1)] = True
        np.testing.assert_array_equal(box_mask(cam, 0.4), expected, err_msg=f"trial {trial}")


def test_refine_equals_masked_matrix_product_per_class():
    rng = np.random.default_rng(2)
    h, w = 4, 5
    cams = torch.from_numpy(rng.random((2, h, w)).astype(np.float32))
    aff = sinkhorn_affinity(torch.rand(h * w, h * w) + 0.05)
    got = refine_cams(cams, aff, 0.4)
    for k in range(2):
        box = torch.from_numpy(box_mask(cams[k].numpy(), 0.4)).view(1, -1).float()
        r = ((aff * box) @ cams[k].reshape(-1, 1)).reshape(h, w)  # reference form: zero columns outside box
        r = r - r.min()
        r = r / (r.max() + 1e-7)
        torch.testing.assert_close(got[k], r, rtol=1e-4, atol=1e-5)
