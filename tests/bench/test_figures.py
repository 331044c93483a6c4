"""bench.figures: PCA-to-RGB of dense features, prediction panels, the fixed palette, the harness figure."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench.figures import (
    PALETTE,
    feature_grid,
    fixed_indices,
    grid_from_npz,
    mask_rgb,
    method_feature_figure,
    pca_components,
    pca_rgb,
    pca_rgb_list,
    prediction_figure,
)


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _has_colour(img: np.ndarray, rgb) -> bool:
    return bool(np.all(img == np.asarray(rgb, dtype=np.uint8), axis=-1).any())


def test_palette_is_fixed_distinct_and_ignore_is_black():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert len(np.unique(PALETTE[:255], axis=0)) == 255  # every class id its own colour
    assert PALETTE[255].tolist() == [0, 0, 0]
    assert not any((PALETTE[:255] == 0).all(1))  # no class looks like ignore
    mask = np.array([[0, 1], [255, 300]])
    out = mask_rgb(mask)
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == PALETTE[0].tolist() and out[0, 1].tolist() == PALETTE[1].tolist()
    assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 0, 0]  # out of range counts as ignore
    assert (mask_rgb(torch.tensor(mask)) == out).all()


def _clustered(seed=0, b=2, c=16, h=6, w=5):
    """B×C×h×w features: each token is one of four random centres (spanning 3 dimensions, so all three
    components carry signal) plus small noise; also the labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, c, generator=g) * 3
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[0, 0, :4] = torch.tensor([0, 1, 2, 3])  # every cluster present
    feats = centres[labels].permute(0, 3, 1, 2) + 0.01 * torch.randn(b, c, h, w, generator=g)
    return feats, labels


def test_pca_rgb_gives_one_colour_per_cluster():
    feats, labels = _clustered()
    rgb = pca_rgb(feats).astype(float)
    assert rgb.shape == (2, 6, 5, 3)
    means = [rgb[labels.numpy() == k].mean(0) for k in range(4)]
    for k in range(4):
        spread = np.abs(rgb[labels.numpy() == k] - means[k]).max()
        assert spread < 12  # the noise is tiny next to the cluster separation
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).max() > 60  # clusters are clearly different colours


def test_pca_rgb_is_invariant_to_rotation_and_shift_of_the_feature_space():
    feats, _ = _clustered(seed=1)
    feats = feats + 0.3 * torch.randn_like(feats)  # break ties: a generic cloud
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)))
    moved = torch.einsum("dc,bchw->bdhw", q, feats) + torch.randn(16).view(1, 16, 1, 1) * 10
    a, b = pca_rgb(feats).astype(int), pca_rgb(moved).astype(int)
    assert np.abs(a - b).max() <= 1  # same picture up to rounding: no dependence on SVD signs or basis


def test_pca_rgb_matches_sklearn_pca():
    sklearn = pytest.importorskip("sklearn.decomposition")
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 8, 7, 7, generator=g) * torch.linspace(3, 0.2, 8).view(1, 8, 1, 1)
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
    scores = sklearn.PCA(n_components=3, svd_solver="full").fit_transform(tokens)
    expected = np.empty_like(scores)
    for k in range(3):
        s = scores[:, k] if (scores[:, k] ** 3).mean() >= 0 else -scores[:, k]
        lo, hi = np.percentile(s, 1), np.percentile(s, 99)
        expected[:, k] = np.round(np.clip((s - lo) / (hi - lo), 0, 1) * 255)
    got = pca_rgb(feats).reshape(-1, 3).astype(float)
    assert np.abs(got - expected).max() <= 1
    _, dirs = pca_components(torch.from_numpy(tokens), 3)
    overlap = np.abs(dirs.numpy().T @ sklearn.PCA(n_components=3).fit(tokens).components_.T)
    assert np.allclose(overlap, np.eye(3), atol=1e-6)


def test_pca_rgb_degenerate_inputs_are_grey_not_noise():
    const = torch.ones(1, 5, 3, 3) * 7.0
    assert (pca_rgb(const) == 128).all()
    two = torch.stack([torch.arange(9.0).view(3, 3), torch.zeros(3, 3)])[None]  # C=2: one real component
    out = pca_rgb(two)
    assert (out[..., 1] == 128).all() and (out[..., 2] == 128).all()
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    with pytest.raises(ValueError):
        pca_rgb(torch.zeros(4, 4))


def test_pca_rgb_list_is_one_joint_pca_over_grids_of_different_sizes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, 5, generator=g), torch.randn(6, 3, 3, generator=g)
    maps = pca_rgb_list([a, b])
    assert maps[0].shape == (4, 5, 3) and maps[1].shape == (3, 3, 3)
    tokens = torch.cat([a.reshape(6, -1), b.reshape(6, -1)], 1)  # 6×29
    joint = pca_rgb(tokens.view(1, 6, 29, 1))[0, :, 0]
    assert (np.concatenate([maps[0].reshape(-1, 3), maps[1].reshape(-1, 3)]) == joint).all()


def test_prediction_figure_draws_palette_colours_and_grows_with_rows():
    img = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    gt = torch.full((32, 32), 3)
    pred = torch.full((16, 16), 5)  # a lower resolution than the image: drawn at the image's extent
    pred[:4, :4] = 255
    one = _decode(prediction_figure([img], [gt], [pred], ["c0", "c1", "c2", "c3", "c4", "c5"], title="t"))
    two = _decode(prediction_figure([img, img], [gt, gt], [pred, pred], None))
    assert _has_colour(one, PALETTE[3]) and _has_colour(one, PALETTE[5]) and _has_colour(one, (0, 0, 0))
    assert two.shape[0] > one.shape[0] * 1.4 and two.shape[1] == one.shape[1]


def test_feature_grid_has_a_column_per_method():
    imgs = [np.zeros((24, 24, 3), np.uint8)]
    red = np.zeros((3, 3, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((6, 6, 3), np.uint8)
    blue[..., 2] = 255
    one = _decode(feature_grid(imgs, {"a": [red]}))
    both = _decode(feature_grid(imgs, {"a": [red], "b": [blue]}))
    assert _has_colour(both, (255, 0, 0)) and _has_colour(both, (0, 0, 255)) and not _has_colour(one, (0, 0, 255))
    assert both.shape[1] > one.shape[1] * 1.3


def test_fixed_indices():
    assert fixed_indices(10, 4) == [0, 3, 6, 9]
    assert fixed_indices(3, 4) == [0, 1, 2]
    assert fixed_indices(1, 4) == [0]
    assert fixed_indices(0, 4) == []


def _spec(num_val=6):
    from bench.config import BackboneConfig, to_dict
    from bench.data.synthetic import SyntheticConfig

    return {"backbone": to_dict(BackboneConfig()), "seed": 0, "eval_dataset": "synthetic",
            "eval_dataset_cfg": to_dict(SyntheticConfig(num_train=4, num_val=num_val))}


def test_method_feature_figure_and_grid(tmp_path):
    torch.set_num_threads(2)
    path = method_feature_figure("random-init", None, _spec(), str(tmp_path / "a"), n_images=3)
    assert path == str(tmp_path / "a" / "features_pca.png") and os.path.exists(path)
    with np.load(tmp_path / "a" / "features_pca.npz") as z:
        assert sorted(z.files) == ["image_0", "image_1", "image_2", "pca_0", "pca_1", "pca_2"]
        assert z["image_0"].shape == (96, 96, 3) and z["pca_0"].shape == (12, 12, 3)  # 96 px / patch 8
        first = z["image_0"]
    from bench.data import build_dataset
    from bench.data.synthetic import SyntheticConfig

    val = build_dataset("synthetic", SyntheticConfig(num_train=4, num_val=6), "val")
    assert (first == val[0]["image"].permute(1, 2, 0).numpy()).all()  # fixed images: 0, then evenly spaced
    assert _decode(open(path, "rb").read()).shape[0] > 300
    method_feature_figure("random-init", None, _spec(), str(tmp_path / "b"), n_images=3)
    grid = grid_from_npz({"m1": str(tmp_path / "a" / "features_pca.npz"), "m2": str(tmp_path / "b" / "features_pca.npz"),
                          "missing": str(tmp_path / "nope.npz")})
    single = _decode(open(path, "rb").read())
    assert _decode(grid).shape[1] > single.shape[1] * 1.3  # image + two method columns
    assert grid_from_npz({"x": str(tmp_path / "nope.npz")}) is None


def test_linseg_returns_a_predictions_figure():
    from bench.config import build
    from bench.data import build_dataset
    from bench.data.synthetic import SyntheticConfig
    from bench.registry import TASKS
    from tasks.base import EvalData

    torch.manual_seed(0)
    cfg = SyntheticConfig(num_train=8, num_val=5)
    train, val = build_dataset("synthetic", cfg, "train"), build_dataset("synthetic", cfg, "val")
    data = EvalData("synthetic", train, val, val.num_classes, list(val.class_names))
    cls = TASKS.get("linseg")
    task = cls(build(cls.config_class, {"epochs": 1, "drop_at": 1}, "tasks.linseg"))

    def feats(x):  # a fixed random projection of 8×8 patches: any dense feature map will do here
        return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 4, 1, 1)

    res = task.evaluate(feats, data, torch.device("cpu"))
    img = _decode(res.figures["predictions.png"])
    assert img.shape[0] > 4 * 150  # four rows (the first four val images) of ~190 px
    gt_classes = {int(v) for i in range(4) for v in val[i]["mask"].unique() if v != 255}
    assert all(_has_colour(img, PALETTE[k]) for k in gt_classes)
