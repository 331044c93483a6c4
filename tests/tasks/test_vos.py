"""``vos``: J and F on hand-made masks, label propagation on a clip whose answer is known, the image -> video
dataset wiring, and the synthetic video dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bench.config import build
from bench.data import SegDataset, build_dataset
from bench.errors import BenchError
from tasks.base import EvalData
from tasks.metrics import boundary_f, boundary_map, region_j
from tasks.propagation import propagate, window_mask
from tasks.vos import VideoSegmentation, VosConfig, _resized_size, protocol_line, score_video, video_data


def test_region_j_by_hand():
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[0:2, 0:3] = True  # 6 px
    b[1:3, 0:3] = True  # 6 px, 3 shared
    assert region_j(a, b) == pytest.approx(3 / 9)
    void = np.zeros((6, 6), bool)
    void[2, :] = True  # drops b's non-shared row
    assert region_j(a, b, void) == pytest.approx(3 / 6)
    assert region_j(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # both empty


def test_boundary_f_by_hand():
    # single pixels: a pixel's boundary (DAVIS seg2bmap) is itself plus its upper, left and upper-left neighbours
    gt = np.zeros((5, 5), bool)
    gt[1, 1] = True
    assert set(zip(*np.nonzero(boundary_map(gt)))) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    pred = np.zeros((5, 5), bool)
    pred[1, 3] = True  # boundary {(0,2),(0,3),(1,2),(1,3)}
    # tolerance 1 px: pred (0,2),(1,2) are within 1 of gt's; gt (0,1),(1,1) within 1 of pred's -> P = R = 1/2
    assert boundary_f(pred, gt, bound_th=1) == pytest.approx(0.5)
    assert boundary_f(gt, gt, bound_th=1) == 1.0
    assert boundary_f(np.zeros((5, 5)), gt, bound_th=1) == 0.0  # one side empty
    assert boundary_f(np.zeros((5, 5)), np.zeros((5, 5)), bound_th=1) == 1.0  # both empty
    assert region_j(pred, gt) == 0.0


def test_boundary_tolerance_is_0008_of_the_diagonal():
    # 480×854 (DAVIS 480p): ceil(0.008 × 979.7) = 8 px. A square shifted by 8 px keeps F = 1, by 10 px it drops
    gt = np.zeros((480, 854), bool)
    gt[100:300, 200:400] = True
    near = np.roll(gt, 8, axis=1)
    far = np.roll(gt, 10, axis=1)
    assert boundary_f(near, gt) == 1.0
    assert boundary_f(far, gt) < 0.8
    # against a brute-force distance check of the same definition (boundary pixels within the radius)
    pb, gb = np.argwhere(boundary_map(far)), np.argwhere(boundary_map(gt))
    d = np.sqrt(((pb[:, None, :] - gb[None, :, :]) ** 2).sum(-1))
    p, r = (d.min(1) <= 8).mean(), (d.min(0) <= 8).mean()
    assert boundary_f(far, gt) == pytest.approx(2 * p * r / (p + r))


def test_window_and_topk_temperature():
    m = window_mask(3, 4, 1)
    assert m.shape == (12, 12) and m[0].reshape(3, 4).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    # one context frame of 2 tokens (D=2 × h=1 × w=2): token0 = e0 (label 0), token1 = e1 (label 1)
    ctx = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    lab = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    tgt = torch.tensor([[[1.0, 0.6]], [[0.0, 0.8]]])  # target token0 = e0, token1 = (0.6, 0.8)
    out = propagate(tgt, [ctx], [lab], 1, 0.1, None)  # top-1: copy the most similar context token's label
    assert out[:, 0, :].T.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    out = propagate(tgt, [ctx], [lab], 2, 0.1, None)  # top-2 for target token1: sims 0.6 (label 0), 0.8 (label 1)
    w = torch.softmax(torch.tensor([0.6, 0.8]) / 0.1, 0)
    assert out[:, 0, 1].tolist() == pytest.approx(w.tolist(), abs=1e-6)
    assert out[:, 0, 1].tolist() != pytest.approx(torch.softmax(torch.tensor([0.6, 0.8]) / 1.0, 0).tolist())
    # the window: target token1 restricted to radius 0 sees only context token1
    out = propagate(tgt, [ctx], [lab], 2, 0.1, window_mask(1, 2, 0))
    assert out[:, 0, :].T.tolist() == [[1.0, 0.0], [0.0, 1.0]]


class _Clip(SegDataset):
    """One clip: a white 16×16 square moving 8 px right per frame over black, 6 frames of 48×64."""

    is_video = True
    num_classes = 0
    class_names: list = []

    def __len__(self):
        return 1

    def __getitem__(self, i):
        t, h, w = 6, 48, 64
        masks = torch.zeros(t, h, w, dtype=torch.long)
        for k in range(t):
            masks[k, 16:32, 8 * k:8 * k + 16] = 1
        frames = (masks[:, None].repeat(1, 3, 1, 1) * 255).to(torch.uint8)
        return {"index": 0, "name": "clip", "frames": frames, "masks": masks, "num_objects": 1,
                "image": frames[0], "mask": masks[0]}


def _tokens(images):
    """8×8-pixel tokens: brightness -> (bright, dark) one-hot-ish features."""
    b = F.avg_pool2d(images.mean(1, keepdim=True), 8)
    return torch.cat([b, -b], 1)


def test_propagation_recovers_a_moving_square():
    data = EvalData("clip", _Clip(), _Clip(), 0, [])
    res = VideoSegmentation(build(VosConfig, {}, "tasks.vos")).evaluate(_tokens, data, torch.device("cpu"))
    # propagation finds the square's tokens exactly; the known answer is then the protocol's upsampling of the
    # true token labels (bilinear, per-channel min-max, argmax), which rounds the square's corners off
    clip = data.val[0]
    expect_j, expect_f = [], []
    for t in range(1, 5):
        tok = F.one_hot(clip["masks"][t, 4::8, 4::8], 2).permute(2, 0, 1)[None].float()
        up = F.interpolate(tok, size=(48, 64), mode="bilinear", align_corners=False)[0]
        pred = up.argmax(0).numpy() == 1
        expect_j.append(region_j(pred, clip["masks"][t].numpy() == 1))
        expect_f.append(boundary_f(pred, clip["masks"][t].numpy() == 1))
    assert 0.8 < np.mean(expect_j) < 1.0
    assert res.metrics["j_mean"] == pytest.approx(100.0 * np.mean(expect_j))
    assert res.metrics["f_mean"] == pytest.approx(100.0 * np.mean(expect_f))
    assert "over 1 objects, 1 clip val clips" in res.protocol
    res1 = VideoSegmentation(build(VosConfig, {"topk": 1, "n_last_frames": 0}, "tasks.vos"))
    # only the first frame as context, top-1: tokens copy same-brightness tokens, the square is found anywhere
    assert res1.evaluate(_tokens, data, torch.device("cpu")).metrics["j_mean"] == pytest.approx(res.metrics["j_mean"])
    # a window of radius 1 token with only the first frame as context: by frame 3 the square is 3 tokens away
    # from where it started, so bright target tokens see only dark context tokens and the object is lost
    far = VideoSegmentation(build(VosConfig, {"neighbourhood": 1, "n_last_frames": 0}, "tasks.vos"))
    assert far.evaluate(_tokens, data, torch.device("cpu")).metrics["j_mean"] < 60.0


def test_score_video_excludes_first_and_last_frames():
    gt = torch.zeros(4, 8, 8, dtype=torch.long)
    gt[:, 2:6, 2:6] = 1
    pred = gt.clone()
    pred[0] = 0  # first and last frames are not scored
    pred[3] = 0
    pred[2, 2:4, 2:6] = 0  # frame 2: half the object
    js, fs = score_video(pred, gt, 1, bound_th=1)
    assert js[0] == pytest.approx([1.0, 0.5])
    assert fs[0][0] == 1.0 and 0 < fs[0][1] < 1


def test_resized_size_as_dino():
    assert _resized_size(480, 854, 480, 16) == (480, 832)  # long side floored to a multiple of 64
    assert _resized_size(854, 480, 480, 8) == (832, 480)
    assert _resized_size(96, 96, 0, 8) == (96, 96)
    assert _resized_size(100, 100, 0, 16) == (96, 96)


def test_image_dataset_maps_to_its_video_counterpart():
    img = EvalData("synthetic", build_dataset("synthetic", None, "train"), build_dataset("synthetic", None, "val"),
                   10, [])
    name, videos = video_data(img)
    assert name == "synthetic_video" and getattr(videos, "is_video", False)
    assert videos.cfg.size == img.val.cfg.size
    other = EvalData("toy", object(), object(), 3, [])
    with pytest.raises(BenchError, match="davis17, synthetic_video"):
        video_data(other)


def test_synthetic_video_clips_move_and_are_deterministic():
    ds = build_dataset("synthetic_video", None, "val")
    a, b = ds[3], ds[3]
    assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["masks"], b["masks"])
    assert a["frames"].shape == (8, 3, 96, 96) and a["masks"].shape == (8, 96, 96)
    moved = 0
    for i in range(6):
        item = ds[i]
        ids = set(torch.unique(item["masks"][0]).tolist())
        assert ids == set(range(item["num_objects"] + 1)) and item["num_objects"] >= 1
        moved += int(not torch.equal(item["masks"][0], item["masks"][-1]))
    assert moved >= 5
    assert not torch.equal(ds[0]["frames"], build_dataset("synthetic_video", None, "train")[0]["frames"])


def test_vos_runs_on_the_synthetic_default():
    from bench.backbones import create_backbone

    img = EvalData("synthetic", build_dataset("synthetic", None, "train"), build_dataset("synthetic", None, "val"),
                   10, [])
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_d4_p8").eval()
    res = VideoSegmentation(build(VosConfig, {"max_videos": 2}, "tasks.vos")).evaluate(
        model.forward_dense, img, torch.device("cpu"))
    assert 0.0 <= res.metrics["jf"] <= 100.0
    assert res.metrics["jf"] == pytest.approx((res.metrics["j_mean"] + res.metrics["f_mean"]) / 2)
    assert res.protocol == protocol_line(build(VosConfig, {"max_videos": 2}, "tasks.vos"),
                                         len(res.per_class["j_per_object"]), 2, "synthetic_video")
