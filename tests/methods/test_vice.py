"""ViCE: superpixel views (shared ids, geometry), region pooling, the swap + coherence loss, a short run."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import BackboneConfig
from methods.vice.views import (SuperpixelViews, SuperpixelViewSpec, crop_padded, grid_labels,
                                    keep_common_ids, slic_labels)
from bench.errors import BenchError
from methods.build import build_method
from methods.base import Schedule
from methods.common.geometry import cell_centers
from methods.vice.regions import align_regions, downsample_labels, segment_argmax, segment_mean


def _vice(**cfg):
    torch.manual_seed(0)
    return build_method("vice", cfg, BackboneConfig(), Schedule(total_steps=10, steps_per_epoch=5, epochs=2))


# ------------------------------------------------------------------------------------ region pooling

def test_segment_ops_on_a_hand_built_map():
    index = torch.tensor([0, 0, 1, -1, 1, 2, 2, 2])
    values = torch.tensor([[1.0], [3.0], [5.0], [100.0], [7.0], [0.0], [3.0], [3.0]])
    mean, cnt = segment_mean(values, index, 4)
    assert mean[:, 0].tolist() == [2.0, 6.0, 2.0, 0.0] and cnt.tolist() == [2, 2, 3, 0]
    score = torch.tensor([0.1, 0.5, 0.9, 5.0, 0.2, 0.3, 0.7, 0.7])
    # the ignored pixel (index −1) never wins; ties go to the first position; empty segments give −1
    assert segment_argmax(score, index, 4).tolist() == [1, 2, 6, -1]


def test_align_regions_matches_rows_by_image_and_id():
    v0 = torch.tensor([[5, 5, 2, -1], [0, 7, 7, 0]])  # 2 images × 4 pixels
    v1 = torch.tensor([[2, 9, 5, 5], [7, 0, -1, 3]])  # id 9 and 3 are not in view 0
    (i0, i1), image, ids = align_regions([v0, v1])
    assert image.tolist() == [0, 0, 1, 1] and ids.tolist() == [2, 5, 0, 7]  # sorted by (image, id)
    assert i0.tolist() == [1, 1, 0, -1, 2, 3, 3, 2]
    assert i1.tolist() == [0, -1, 1, 1, 3, 2, -1, -1]
    (m0,), _, ids = align_regions([v0], min_id=1)  # mean mode drops id 0
    assert ids.tolist() == [2, 5, 7] and m0.tolist() == [1, 1, 0, -1, -1, 2, 2, -1]


def test_downsample_labels_takes_cell_centres():
    lab = torch.arange(16).view(1, 4, 4)
    assert downsample_labels(lab, 2).tolist() == [[[5, 7], [13, 15]]]


def test_representative_pooling_and_coherence_by_hand():
    m = _vice(embed_dim=2, n_prototypes=2)
    with torch.no_grad():
        m.prototypes.weight.copy_(torch.eye(2))
    # one image, 2×3 pixels; region 0: (1,0) and (0.6,0.8); region 1: (0,1) and (0,−1); region 2: one direction
    z = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]],
                      [[0.8, 0.6], [2.4, 1.8], [0.0, -1.0]]])  # h×w×D
    feat = z.permute(2, 0, 1)[None]  # 1×2×2×3
    labels = torch.tensor([[[0, 0, 1], [2, 2, 1]]])
    out = m.loss_fn.pool([feat], [labels], m.prototypes.weight)
    # representatives: the pixel with the highest max-prototype score
    assert torch.allclose(out["sigma"][0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]))
    assert torch.allclose(out["emb"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]))
    # coherence: region means of ‖z̄_i − e_r‖ are (0 + √0.8)/2, (0 + 2)/2, 0; then their mean
    expect = (math.sqrt(0.8) / 2 + 1.0 + 0.0) / 3
    assert out["coh_pairs"] == 1 and abs(float(out["coh_sum"]) - expect) < 1e-5
    # the swap gradient reaches the representative pixel only
    feat = feat.clone().requires_grad_(True)
    m.loss_fn.pool([feat], [labels], m.prototypes.weight)["sigma"][0].sum().backward()
    touched = feat.grad.abs().sum(dim=1)[0] > 0
    assert touched.tolist() == [[True, False, True], [True, False, False]]


def test_mean_pooling_drops_id_zero_and_normalises_the_region_mean():
    m = _vice(embed_dim=2, n_prototypes=2, pooling="mean")
    with torch.no_grad():
        m.prototypes.weight.copy_(torch.eye(2))
    z = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 2.0], [0.0, 2.0]]])
    out = m.loss_fn.pool([z.permute(2, 0, 1)[None]], [torch.tensor([[[0, 1], [2, 2]]])], m.prototypes.weight)
    assert torch.allclose(out["sigma"][0], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert out["coh_pairs"] == 0


def test_swap_loss_by_hand():
    m = _vice()
    sigma = torch.tensor([[[0.0, 0.0], [0.0, 0.0]],          # view 0: no loss on its predictions
                          [[1.0, 0.0], [0.0, 1.0]]])         # view 1 predicts the codes at τ = 0.1
    codes = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    lse = math.log(1 + math.exp(-10))
    row0, row1 = 0.7 * lse + 0.3 * (10 + lse), 0.4 * (10 + lse) + 0.6 * lse
    present = torch.ones(2, 2, dtype=torch.bool)
    loss, _ = m.loss_fn.swap(sigma, present, codes)
    assert abs(float(loss) - (row0 + row1) / 2) < 1e-5
    present[1, 1] = False  # a region missing from view 1 is left out of that view's mean
    loss, _ = m.loss_fn.swap(sigma, present, codes)
    assert abs(float(loss) - row0) < 1e-5
    # V = 3: the mean over views 1 and 2
    loss, _ = m.loss_fn.swap(torch.cat([sigma, sigma[1:]]), torch.ones(3, 2, dtype=torch.bool), codes)
    assert abs(float(loss) - (row0 + row1) / 2) < 1e-5


# ------------------------------------------------------------------------------------ the view recipe

def _noise_image(size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_view_labels_follow_the_geometry_under_crop_and_flip(flip_p):
    """regular_grid gives a known label map: id = (y // 8)·8 + x // 8 on a 64-px image. Every view pixel's id
    must be the id of the source pixel its box/flip geometry points at (away from cell borders)."""
    spec = SuperpixelViewSpec(n_views=3, view_size=32, min_img_size=64, region_size=8, regular_grid=True,
                              flip_p=flip_p, mask=False)
    tr = SuperpixelViews(spec)
    checked = 0
    for seed in range(4):
        torch.manual_seed(seed)
        s = tr(_noise_image(seed=seed))
        assert s["flips"].tolist() == [bool(flip_p)] * 3
        for v in range(3):
            box, flip = s["boxes"][v:v + 1], s["flips"][v:v + 1]
            centres = cell_centers(box, flip, (32, 32))[0]  # 32×32×2 source (x, y)
            lab = s["superpixels"][v]
            x, y = centres[..., 0], centres[..., 1]
            known = (torch.div(y, 8, rounding_mode="floor") * 8 + torch.div(x, 8, rounding_mode="floor")).long()
            # nearest resizing reads a source pixel up to half a view pixel (+1 source px) from the centre
            scale = float(max(box[0, 2] - box[0, 0], box[0, 3] - box[0, 1])) / 32
            m = 0.5 * scale + 1.5
            far = (x % 8 > m) & (x % 8 < 8 - m) & (y % 8 > m) & (y % 8 < 8 - m)
            sel = far & (lab >= 0)
            assert sel.sum() > 20
            assert torch.equal(lab[sel], known[sel])
            checked += int(sel.sum())
            if flip_p:  # reading the view unflipped points at the wrong cells
                wrong = cell_centers(box, ~flip, (32, 32))[0]
                wx = torch.div(wrong[..., 0], 8, rounding_mode="floor")
                wk = (torch.div(wrong[..., 1], 8, rounding_mode="floor") * 8 + wx).long()
                assert (lab[sel] != wk[sel]).float().mean() > 0.3
    assert checked > 500


def test_every_view_carries_the_same_ids_and_noise_covers_only_dropped_regions():
    spec = SuperpixelViewSpec(n_views=3, view_size=32, min_img_size=64, region_size=6)
    tr = SuperpixelViews(spec)
    masked_any = False
    for seed in range(6):
        torch.manual_seed(seed)
        s = tr(_noise_image(seed=seed))
        ids = [set(torch.unique(lab).tolist()) - {-1} for lab in s["superpixels"]]
        assert ids[0] and all(i == ids[0] for i in ids)
        for x, lab, nm in zip(s["views"], s["superpixels"], s["noise_masks"]):
            assert x.shape == (3, 32, 32) and lab.shape == (32, 32) and lab.dtype == torch.int64
            assert (lab[nm] == -1).all()  # a masked superpixel is no longer common
            if nm.any():
                masked_any = True
                assert x[:, nm].abs().max() <= 1.0  # U(−1, 1) noise after normalisation
    assert masked_any


def test_common_id_filter_and_padded_crop():
    a = np.array([[0, 0, 1], [2, 3, 3]], np.int32)
    b = np.array([[3, 1, 9], [2, 2, 0]], np.int32)
    # view 0 anywhere: {0, 1, 2, 3}; view 1 inside its rectangle (x 0..2, y 0..1): {3, 1}
    out = keep_common_ids([a, b], [(0, 0, 3, 2), (0, 0, 2, 1)])
    assert out[0].tolist() == [[-1, -1, 1], [-1, 3, 3]] and out[1].tolist() == [[3, 1, -1], [-1, -1, -1]]
    crop = crop_padded(a, (-1, 0, 2, 3), -1)
    assert crop.tolist() == [[-1, 0, 0], [-1, 2, 3], [-1, -1, -1]]


def test_slic_respects_strong_colour_edges_and_grid_cells_have_the_region_size():
    img = np.zeros((48, 48, 3), np.uint8)
    img[:24, :24] = (250, 20, 20)
    img[:24, 24:] = (20, 250, 20)
    img[24:, :24] = (20, 20, 250)
    img[24:, 24:] = (240, 240, 20)
    lab = slic_labels(img, region_size=8, ruler=10.0, iters=5)
    assert lab.shape == (48, 48) and 20 <= len(np.unique(lab)) <= 60
    quadrant = (np.arange(48)[:, None] >= 24) * 2 + (np.arange(48)[None, :] >= 24)
    for i in np.unique(lab):
        assert len(np.unique(quadrant[lab == i])) == 1  # no superpixel crosses a colour edge
    g = grid_labels(40, 40, 8)
    assert len(np.unique(g)) == 25 and (np.bincount(g.ravel()) == 64).all()


def test_decoder_depth_is_the_number_of_separable_convs():
    x = torch.randn(2, 3, 64, 64)
    for n in (0, 1, 2):
        m = _vice(fuse_convs=n)
        assert len(m.trunk.fuse) == n
        assert sum(isinstance(mod, nn.Conv2d) and mod.groups > 1 for mod in m.trunk.modules()) == n  # depthwise
        assert m.trunk(x).shape == (2, 128, 16, 16)
    with pytest.raises(BenchError, match="fuse_convs"):
        _vice(fuse_convs=-1)


def test_bad_config_is_a_bench_error():
    with pytest.raises(BenchError, match="pooling"):
        _vice(pooling="max")
    with pytest.raises(BenchError, match="view_size"):
        _vice(view_size=60)


# ------------------------------------------------------------------------------------ training

def test_training_step_freezes_prototypes_then_renormalises_them():
    m = _vice(view_size=32, min_img_size=64, n_views=3, region_size=6, freeze_prototypes_iters=1,
              queue_length=64, queue_start_iter=1)
    tr = SuperpixelViews(m.view_spec())
    from bench.data.views import collate_views

    torch.manual_seed(0)
    batch = collate_views([tr(_noise_image(seed=i)) for i in range(4)])
    assert len(batch["superpixels"]) == 3 and batch["superpixels"][0].shape == (4, 32, 32)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    before = m.prototypes.weight.detach().clone()
    out = m(batch, 0)
    assert out["regions_per_image"] > 1 and out["queue_used"] == 0.0
    out["loss"].backward()
    m.on_after_backward(0)
    assert m.prototypes.weight.grad is None  # frozen during the first iteration
    opt.step()
    m.after_step(0)
    assert torch.allclose(m.prototypes.weight, before, atol=1e-6)
    opt.zero_grad()
    out = m(batch, 1)
    assert out["queue_used"] == 1.0 and int(m.queue.pushed) > 0
    out["loss"].backward()
    m.on_after_backward(1)
    assert m.prototypes.weight.grad is not None
    opt.step()
    m.after_step(1)
    assert not torch.allclose(m.prototypes.weight, before)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(m.cfg.n_prototypes), atol=1e-5)
    feats = m.dense_features(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 128, 16, 16) and torch.allclose(feats.norm(dim=1), torch.ones(2, 16, 16), atol=1e-4)


def test_short_pretraining_run_decreases_the_loss(tmp_path):
    from bench.pretrain import train_loop

    out = tmp_path / "run"
    train_loop({"method": "vice", "method_cfg": {"view_size": 32, "n_views": 3, "region_size": 6},
                "pretrain": {"epochs": 1, "steps_per_epoch": 12, "batch_size": 8, "log_every": 1, "lr": 1e-3,
                             "warmup_epochs": 0.0, "optimizer": "adamw", "checkpoint_every": 1000},
                "backbone": {}, "dataset": "synthetic", "dataset_cfg": {"num_train": 96, "num_val": 8},
                "seed": 0, "out_dir": str(out)})
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
