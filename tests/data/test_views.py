import torch

from bench.data import IMAGENET_MEAN, IMAGENET_STD
from bench.data.views import MultiCrop, MultiCropSpec, collate_views
from methods.common.geometry import cell_centers, cell_size, normalized_positions


def _ramp_image(h=96, w=96):
    """R = 2·col, G = 2·row: the value at continuous x is 2·(x − 0.5), linear, so resizing keeps it exact-ish."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([2 * xs, 2 * ys, torch.zeros_like(xs)]).to(torch.uint8)


def _no_photometric(**kw):
    return MultiCropSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), **kw)


def _unnormalize(view):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (view * std + mean) * 255.0


def test_boxes_and_flips_map_crop_pixels_back_to_the_source():
    torch.manual_seed(0)
    image = _ramp_image()
    spec = _no_photometric(n_global=2, n_local=4, global_size=48, local_size=24, flip_p=0.5)
    seen_flip = {True: 0, False: 0}
    for _ in range(10):
        sample = MultiCrop(spec)(image)
        for v, view in enumerate(sample["views"]):
            s = view.shape[-1]
            box, flip = sample["boxes"][v], sample["flips"][v]
            seen_flip[bool(flip)] += 1
            centres = cell_centers(box[None], flip[None], (s, s))[0]  # s×s×2 source (x, y)
            rgb = _unnormalize(view)
            inner = slice(3, s - 3)  # bicubic overshoot at the crop border is not geometry
            exp_r = 2 * (centres[..., 0] - 0.5)
            exp_g = 2 * (centres[..., 1] - 0.5)
            # a wrong flip or box would be off by tens of intensity levels
            assert (rgb[0][inner, inner] - exp_r[inner, inner]).abs().max() < 4.0
            assert (rgb[1][inner, inner] - exp_g[inner, inner]).abs().max() < 4.0
    assert seen_flip[True] > 0 and seen_flip[False] > 0


def test_box_areas_follow_the_scale_ranges():
    torch.manual_seed(1)
    spec = _no_photometric(n_global=2, n_local=2, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))
    image = torch.zeros(3, 96, 96, dtype=torch.uint8)
    for _ in range(20):
        s = MultiCrop(spec)(image)
        b = s["boxes"]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (96 * 96)
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 96).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 96).all()
        assert (area[:2] >= 0.4 - 0.02).all() and (area[2:] <= 0.4 + 0.02).all()
        assert [v.shape[-1] for v in s["views"]] == [64, 64, 32, 32]


def test_same_box_for_globals_shares_geometry():
    spec = _no_photometric(n_global=2, same_box_for_globals=True, flip_p=0.0)
    s = MultiCrop(spec)(_ramp_image())
    assert torch.equal(s["boxes"][0], s["boxes"][1])


def test_cell_centers_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [10.0, 20.0, 50.0, 40.0]])
    flips = torch.tensor([False, True])
    c = cell_centers(boxes, flips, (2, 4))  # cells are 10 px wide and 10 px high
    assert torch.allclose(c[0, 0, :, 0], torch.tensor([15.0, 25.0, 35.0, 45.0]))
    assert torch.allclose(c[1, 0, :, 0], torch.tensor([45.0, 35.0, 25.0, 15.0]))  # mirrored
    assert torch.allclose(c[0, :, 0, 1], torch.tensor([25.0, 35.0]))
    assert torch.allclose(c[1, :, 0, 1], torch.tensor([25.0, 35.0]))  # flips are horizontal only
    assert torch.allclose(cell_size(boxes, (2, 4)), torch.tensor([[10.0, 10.0], [10.0, 10.0]]))
    pos = normalized_positions(c, torch.tensor([[100, 200], [100, 200]]))
    assert torch.allclose(pos[0, 0, 0], torch.tensor([15.0 / 200, 25.0 / 100]))


def test_collate_groups_views_by_index():
    spec = _no_photometric(n_global=2, n_local=1)
    image = _ramp_image()
    batch = collate_views([MultiCrop(spec)(image) for _ in range(3)])
    assert [v.shape for v in batch["views"]] == [(3, 3, 64, 64), (3, 3, 64, 64), (3, 3, 32, 32)]
    assert batch["boxes"].shape == (3, 3, 4) and batch["flips"].shape == (3, 3)
    assert batch["size"].tolist() == [[96, 96]] * 3
