"""ViCE's view recipe ``superpixel_views``: contextual square views around an edge-sampled centre, with SLIC superpixel maps.

Faithful to ``shared/specs/methods.md`` §1.2 (VISSL ``DenseSSLDataset``), step by step:

1. standardise the image (upscale the longer side to ``min_img_size``, centre-pad the shorter side with black,
   downscale above ``max_img_size``);
2. view geometry: the centre point is drawn from a Canny edge-density map (+0.005 uniform mass); view 0 has side
   U(resize_range)·view_size; view v = 1…V−1 has its own side and sits in angular sector v−1 of V−1 at a von Mises
   radius (≈ 0.75 of its half side); centres are clipped so each square lies inside the image; the common
   rectangle is the intersection of the V squares;
3. superpixels: ``cv2.ximgproc.createSuperpixelSLIC`` (plain SLIC) on the 3×3-blurred BGR image with
   ``region_size``, ``ruler`` and ``iterate(slic_iters)``, once per sample on the whole image; each view crops the
   same label map, so **an id means the same superpixel in every view** (−1 outside the image);
4. regional masking in the un-resized views (with the reference's quirk: the rectangle's centre and clipping use
   the nominal ``view_size``, its size the view's actual side); masked superpixels are dropped from the common set;
5. resize every view to ``view_size`` (bicubic image, nearest labels and noise mask);
6. keep only the ids present in view 0 and inside the common rectangle of every other view (−1 elsewhere); if none
   survives the geometry is drawn again (the reference draws another image with ``randint(0, idx)``, which crashes
   for idx 0; here up to ``max_tries`` draws on the same image, then an all-ignore sample that the method skips);
7. horizontal flip per view (image, noise mask and label map);
8. photometric: colour jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2, Gaussian blur p 0.5 with σ U(0.1, 2);
   ImageNet normalisation;
9. noise fill: masked pixels become U(−1, 1) in all channels, after normalisation.

Returns per sample (collated by ``collate_views`` into lists over views of batched tensors)::

    views        list of V float 3×S×S
    superpixels  list of V long S×S region ids, −1 = ignore; every view carries exactly the same id set
    noise_masks  list of V bool S×S (pixels replaced by noise)
    boxes        V×4 float (x0, y0, x1, y1) of each view's square in the standardised image
    flips        V bool
    size         2 long (H, W) of the standardised image

Deviations (all configurable): the blur σ is scaled by ``view_size / blur_ref_size`` (CPU default 400, so that
small CPU views are not wiped out; 0 or a 400-px view gives the reference's pixel units); ``cv2.dilate`` uses a 3×3 kernel of ones (the reference passes the tuple (3, 3) as the
kernel). Randomness comes from the torch RNG (the harness seeds it per sample), so runs are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bench.data import IMAGENET_MEAN, IMAGENET_STD
from bench.data.views import SWAV_JITTER
from bench.errors import BenchError
from bench.registry import VIEW_RECIPES


@dataclass
class SuperpixelViewSpec:
    """Reference values (COCO DeepLab config) as defaults; ViCE's method config scales them for the CPU."""

    recipe: str = "superpixel_views"
    n_views: int = 5
    view_size: int = 400
    resize_range: tuple = (0.5, 1.5)  # view side = U(range) · view_size (zoom augmentation)
    min_img_size: int = 500  # std_image_{width,height}; smaller images are upscaled / padded
    max_img_size: int = 2048
    kappa_theta: float = 2.0  # von Mises concentration of the view angle in its sector
    kappa_r: float = 2.0  # von Mises concentration of the view offset radius
    canny: tuple = (10, 50)
    uniform_prob: float = 0.005  # added to the [0, 1] edge map before normalising it to a distribution
    region_size: int = 20  # SLIC average superpixel side in pixels
    ruler: float = 10.0  # SLIC compactness
    slic_iters: int = 5
    regular_grid: bool = False  # ablation: square cells of region_size instead of SLIC
    mask: bool = True
    preserve_ratio: float = 0.25  # fraction of the common ids that are never masked
    mask_intensity: float = 0.25  # max mask rectangle side / view side
    flip_p: float = 0.5
    jitter: tuple = SWAV_JITTER
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    blur_ref_size: int = 400  # σ is scaled by view_size / blur_ref_size; 0: σ in pixels (the reference)
    noise_range: tuple = (-1.0, 1.0)
    max_tries: int = 10

    @property
    def n_views_total(self) -> int:
        return self.n_views

    def validate(self, where: str = "views") -> None:
        if self.n_views < 2:
            raise BenchError(f"{where}.n_views: expected at least 2 views, got {self.n_views}")
        if self.view_size < 8:
            raise BenchError(f"{where}.view_size: expected at least 8 pixels, got {self.view_size}")
        if self.region_size < 1:
            raise BenchError(f"{where}.region_size: expected a positive superpixel side, got {self.region_size}")
        if not 0 < self.resize_range[0] <= self.resize_range[1]:
            raise BenchError(f"{where}.resize_range: expected 0 < low <= high, got {self.resize_range}")


# ------------------------------------------------------------------------------------------ pieces

def standardize(img: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """H×W×3 uint8 -> the reference's standardised image (upscale, centre-pad, cap)."""
    h, w = img.shape[:2]
    longer = max(h, w)
    if longer < min_size:
        s = min_size / longer
        w, h = int(s * w), int(s * h)
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    if w < min_size or h < min_size:
        ph, pw = max(min_size - h, 0), max(min_size - w, 0)
        img = cv2.copyMakeBorder(img, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2, cv2.BORDER_CONSTANT, value=0)
        h, w = img.shape[:2]
    if w > max_size or h > max_size:
        s = max_size / max(h, w)
        img = cv2.resize(img, (int(s * w), int(s * h)), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(img)


def slic_labels(img_rgb: np.ndarray, region_size: int, ruler: float, iters: int) -> np.ndarray:
    """H×W×3 uint8 RGB -> H×W int32 plain-SLIC labels (OpenCV contrib), on the 3×3-blurred BGR image."""
    cv2.setNumThreads(1)
    bgr = cv2.GaussianBlur(np.ascontiguousarray(img_rgb[:, :, ::-1]), (3, 3), 0)
    slic = cv2.ximgproc.createSuperpixelSLIC(bgr, algorithm=cv2.ximgproc.SLIC, region_size=int(region_size),
                                             ruler=float(ruler))
    slic.iterate(int(iters))
    return slic.getLabels().astype(np.int32)


def grid_labels(h: int, w: int, region_size: int) -> np.ndarray:
    """The ``regular_grid`` ablation: about H·W/region_size² square cells."""
    hc, wc = max(int(h / region_size), 1), max(int(w / region_size), 1)
    cells = np.arange(hc * wc, dtype=np.int32).reshape(hc, wc)
    return cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)


def edge_density(img_rgb: np.ndarray, canny: tuple, uniform_prob: float) -> np.ndarray:
    """H×W probability map concentrated on edges (Canny 10/50, L2 gradient, dilated and blurred)."""
    gray = cv2.cvtColor(cv2.GaussianBlur(np.ascontiguousarray(img_rgb[:, :, ::-1]), (3, 3), 0), cv2.COLOR_BGR2GRAY)
    edges = (cv2.Canny(gray, canny[0], canny[1], L2gradient=True) != 0).astype(np.uint8) * 255
    edges = cv2.GaussianBlur(cv2.dilate(edges, np.ones((3, 3), np.uint8)), (3, 3), 0)
    p = edges.astype(np.float64) / 255.0 + uniform_prob
    return p / p.sum()


def _clip_centre(x: float, y: float, h: int, w: int, side: float) -> tuple[int, int]:
    lo_x, hi_x = int(math.ceil(side / 2)), int(w - side / 2)
    lo_y, hi_y = int(math.ceil(side / 2)), int(h - side / 2)
    x = lo_x if x < lo_x else (hi_x if x > hi_x else x)
    y = lo_y if y < lo_y else (hi_y if y > hi_y else y)
    return int(x), int(y)


def sample_view_squares(h: int, w: int, centre: tuple[int, int], spec: SuperpixelViewSpec,
                        rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Contextual views: V integer squares (x0, y0, x1, y1) in image pixels; view 0 is the centre view."""
    lo, hi = spec.resize_range
    a = rng.uniform()
    s0 = (hi * a + lo * (1 - a)) * spec.view_size
    cx, cy = _clip_centre(centre[0], centre[1], h, w, s0)
    centres, sides = [(cx, cy)], [s0]
    n_other = spec.n_views - 1
    sector = 2 * math.pi / n_other
    for v in range(n_other):
        a = rng.uniform()
        s = (hi * a + lo * (1 - a)) * spec.view_size
        ang = v * sector + (rng.vonmises(0.0, spec.kappa_theta) + math.pi) / (2 * math.pi) * sector
        r = (rng.vonmises(0.5 * math.pi, spec.kappa_r) + math.pi) / (2 * math.pi) * (s / 2)
        ang = math.pi / 2 - ang  # the reference measures angles from the y axis
        vx, vy = cx + int(r * math.cos(ang)), cy + int(r * math.sin(ang))
        centres.append(_clip_centre(vx, vy, h, w, s))
        sides.append(s)
    return [(int(x - s / 2), int(y - s / 2), int(x + s / 2), int(y + s / 2)) for (x, y), s in zip(centres, sides)]


def common_rectangle(squares: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """Intersection of the squares; may be empty (x1 <= x0 or y1 <= y0)."""
    x0 = max(s[0] for s in squares)
    y0 = max(s[1] for s in squares)
    x1 = min(s[2] for s in squares)
    y1 = min(s[3] for s in squares)
    return x0, y0, x1, y1


def crop_padded(arr: np.ndarray, box: tuple[int, int, int, int], fill) -> np.ndarray:
    """Crop ``arr`` (H×W or H×W×C) with box (x0, y0, x1, y1); area outside the image gets ``fill``."""
    x0, y0, x1, y1 = box
    h, w = arr.shape[:2]
    out = np.full((y1 - y0, x1 - x0) + arr.shape[2:], fill, dtype=arr.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def _rect_ids(lab: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = rect
    sub = lab[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
    ids = np.unique(sub)
    return ids[ids >= 0]


def mask_views(labels: list[np.ndarray], common_view0: tuple[int, int, int, int], spec: SuperpixelViewSpec,
               rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Regional masking in the un-resized views -> (label maps with non-common ids at −1, noise masks)."""
    common = set(_rect_ids(labels[0], common_view0).tolist())
    n_keep = int(spec.preserve_ratio * len(common))
    preserved = set(rng.choice(np.array(sorted(common)), n_keep, replace=False).tolist()) if n_keep else set()
    big_r = spec.view_size // 2  # nominal: the view has not been resized yet (reference quirk)
    masked_per_view = []
    for lab in labels:
        side = lab.shape[1]
        ang = rng.uniform(0, 2 * math.pi)
        r = (rng.vonmises(0.5 * math.pi, 2.0) + math.pi) * big_r / (2 * math.pi)
        mx, my = int(r * math.cos(ang)) + spec.view_size // 2, int(r * math.sin(ang)) + spec.view_size // 2
        mw = int((rng.vonmises(0.5 * math.pi, 2.0) + math.pi) * spec.mask_intensity * side / (2 * math.pi))
        mh = int((rng.vonmises(0.5 * math.pi, 2.0) + math.pi) * spec.mask_intensity * side / (2 * math.pi))
        mx = min(max(mx, int(math.ceil(mw / 2))), int(spec.view_size - mw / 2))
        my = min(max(my, int(math.ceil(mh / 2))), int(spec.view_size - mh / 2))
        rect = (mx - mw // 2, my - mh // 2, mx + mw // 2, my + mh // 2)
        masked = set(_rect_ids(lab, rect).tolist()) - preserved
        common -= masked
        masked_per_view.append(masked)
    keep = np.array(sorted(common), dtype=np.int64)
    out_labels, noise = [], []
    for lab, masked in zip(labels, masked_per_view):
        noise.append(np.isin(lab, np.array(sorted(masked), dtype=np.int64)))
        out_labels.append(np.where(np.isin(lab, keep), lab, -1).astype(np.int32))
    return out_labels, noise


def keep_common_ids(labels: list[np.ndarray], rects: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """Ids present anywhere in view 0 ∩ ids inside every other view's common rectangle; the rest -> −1."""
    ids = set(np.unique(labels[0]).tolist())
    for lab, rect in zip(labels[1:], rects[1:]):
        ids &= set(_rect_ids(lab, rect).tolist())
    ids.discard(-1)
    keep = np.array(sorted(ids), dtype=np.int64)
    return [np.where(np.isin(lab, keep), lab, -1).astype(np.int32) for lab in labels]


# ------------------------------------------------------------------------------------------ recipe

class SuperpixelViews:
    """Callable ``image (uint8 3×H×W) -> sample dict`` for a :class:`SuperpixelViewSpec`."""

    def __init__(self, spec: SuperpixelViewSpec):
        spec.validate("views")
        self.spec = spec
        self.jitter = v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p)
        self.gray = v2.RandomGrayscale(p=spec.grayscale_p)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def geometry(self, img: np.ndarray, superpixels: np.ndarray, rng: np.random.Generator):
        """One draw of steps 2, 4, 5, 6 -> (squares, resized view crops, label maps, noise masks)."""
        spec = self.spec
        h, w = img.shape[:2]
        p = edge_density(img, spec.canny, spec.uniform_prob).reshape(-1)
        idx = int(rng.choice(p.size, p=p))
        squares = sample_view_squares(h, w, (idx % w, idx // w), spec, rng)
        common = common_rectangle(squares)
        crops, labels, rects = [], [], []
        for sq in squares:
            crops.append(crop_padded(img, sq, 0))
            labels.append(crop_padded(superpixels, sq, -1))
            rects.append((common[0] - sq[0], common[1] - sq[1], common[2] - sq[0], common[3] - sq[1]))
        if spec.mask:
            labels, noise = mask_views(labels, rects[0], spec, rng)
        else:
            noise = [np.zeros(lab.shape, bool) for lab in labels]
        size = spec.view_size
        out_crops, out_labels, out_noise, out_rects = [], [], [], []
        for crop, lab, nm, rect in zip(crops, labels, noise, rects):
            scale = size / crop.shape[1]
            t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)
            out_crops.append(F.resize(t, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True))
            out_labels.append(cv2.resize(lab, (size, size), interpolation=cv2.INTER_NEAREST))
            out_noise.append(cv2.resize(nm.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0)
            out_rects.append(tuple(int(math.floor(c * scale)) for c in rect))
        out_labels = keep_common_ids(out_labels, out_rects)
        return squares, out_crops, out_labels, out_noise

    def _photometric(self, crop: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        crop = self.gray(self.jitter(crop))
        if spec.blur_p > 0 and torch.rand(()) < spec.blur_p:
            lo, hi = spec.blur_sigma
            sigma = float(torch.empty(()).uniform_(lo, hi))
            if spec.blur_ref_size > 0:
                sigma = sigma * spec.view_size / spec.blur_ref_size
            if sigma > 0.05:
                k = max(3, 2 * math.ceil(3 * sigma) + 1)
                crop = F.gaussian_blur(crop, [k, k], [sigma, sigma])
        return crop

    def __call__(self, image: torch.Tensor) -> dict:
        spec = self.spec
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        img = standardize(image.permute(1, 2, 0).contiguous().numpy(), spec.min_img_size, spec.max_img_size)
        h, w = img.shape[:2]
        sp = (grid_labels(h, w, spec.region_size) if spec.regular_grid else
              slic_labels(img, spec.region_size, spec.ruler, spec.slic_iters))
        for _ in range(max(spec.max_tries, 1)):
            squares, crops, labels, noise = self.geometry(img, sp, rng)
            if any((lab >= 0).any() for lab in labels):
                break
        views, sps, masks, flips = [], [], [], []
        lo, hi = spec.noise_range
        for crop, lab, nm in zip(crops, labels, noise):
            flip = bool(torch.rand(()) < spec.flip_p)
            lab_t, nm_t = torch.from_numpy(lab.astype(np.int64)), torch.from_numpy(nm)
            if flip:
                crop, lab_t, nm_t = F.horizontal_flip(crop), lab_t.flip(-1), nm_t.flip(-1)
            x = (self._photometric(crop).float() / 255.0 - self.mean) / self.std
            if nm_t.any():
                noise_vals = torch.empty_like(x).uniform_(lo, hi)
                x = torch.where(nm_t[None], noise_vals, x)
            views.append(x)
            sps.append(lab_t)
            masks.append(nm_t)
            flips.append(flip)
        return {
            "views": views,
            "superpixels": sps,
            "noise_masks": masks,
            "boxes": torch.tensor([list(map(float, s)) for s in squares], dtype=torch.float32),
            "flips": torch.tensor(flips, dtype=torch.bool),
            "size": torch.tensor([h, w], dtype=torch.long),
        }


VIEW_RECIPES.register("superpixel_views")(SuperpixelViews)
