"""View geometry: where each feature-map cell of a crop lies in the source image.

Coordinates are continuous source-image pixels: pixel (row k, col l) covers [l, l+1) × [k, k+1), so its
centre is (l + 0.5, k + 0.5). A crop with box (x0, y0, x1, y1) resized to any side and cut into an h×w
grid has cell (i, j) centred at x = x0 + (j + 0.5)/w · (x1 − x0) (or x0 + (1 − (j + 0.5)/w) · (x1 − x0)
when the crop was mirrored after cropping), y = y0 + (i + 0.5)/h · (y1 − y0).
"""

from __future__ import annotations

import torch


def cell_centers(boxes: torch.Tensor, flips: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """boxes B×4 (x0, y0, x1, y1), flips B bool, grid (h, w) -> B×h×w×2 centres (x, y) in source pixels."""
    h, w = grid
    boxes = boxes.float()
    fx = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) / w  # w
    fy = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) / h  # h
    fx = torch.where(flips.view(-1, 1).to(boxes.device), 1.0 - fx.view(1, -1), fx.view(1, -1))  # B×w
    x0, y0, x1, y1 = boxes.unbind(-1)
    xs = x0[:, None] + fx * (x1 - x0)[:, None]  # B×w
    ys = y0[:, None] + fy.view(1, -1) * (y1 - y0)[:, None]  # B×h
    return torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)


def cell_size(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B×2 (width, height) of one feature cell in source pixels."""
    h, w = grid
    return torch.stack([(boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], dim=-1)


def normalized_positions(centers: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Centres B×...×2 divided by the source image size B×2 (H, W) -> coordinates in [0, 1]."""
    hw = sizes.float().to(centers.device)
    scale = torch.stack([hw[:, 1], hw[:, 0]], dim=-1)  # (W, H) to match (x, y)
    shape = [scale.shape[0]] + [1] * (centers.dim() - 2) + [2]
    return centers / scale.view(shape)


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersections of boxes a, b (B×4) as B×4; empty intersections have x1 <= x0 or y1 <= y0."""
    return torch.stack([torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1]),
                        torch.minimum(a[:, 2], b[:, 2]), torch.minimum(a[:, 3], b[:, 3])], dim=-1)


def boxes_in_crop(region: torch.Tensor, crop_boxes: torch.Tensor, crop_size: tuple[int, int],
                  flips: torch.Tensor | None = None) -> torch.Tensor:
    """Source-pixel boxes ``region`` B×4 -> the same boxes in the pixel coordinates of crops B×4 (x0, y0, x1, y1)
    resized to ``crop_size`` (h, w), mirrored where ``flips`` (B bool) is set. Divide by the patch size for token
    units (``roi_align(..., aligned=True)`` uses the same continuous convention: cell j covers [j, j+1))."""
    h, w = crop_size
    region, crop_boxes = region.float(), crop_boxes.float()
    sx = w / (crop_boxes[:, 2] - crop_boxes[:, 0])
    sy = h / (crop_boxes[:, 3] - crop_boxes[:, 1])
    x0 = (region[:, 0] - crop_boxes[:, 0]) * sx
    x1 = (region[:, 2] - crop_boxes[:, 0]) * sx
    y0 = (region[:, 1] - crop_boxes[:, 1]) * sy
    y1 = (region[:, 3] - crop_boxes[:, 1]) * sy
    if flips is not None:
        f = flips.to(region.device).bool()
        x0, x1 = torch.where(f, w - x1, x0), torch.where(f, w - x0, x1)
    return torch.stack([x0, y0, x1, y1], dim=-1)
