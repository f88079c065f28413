"""Random inpainting masks for training (the SD-inpainting recipe): boxes, brush strokes, or the whole image."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def box_masks(n: int, height: int, width: int, generator: torch.Generator | None = None,
              min_side: float = 0.2, max_side: float = 0.7) -> Tensor:
    """n x 1 x H x W masks, each one axis-aligned box with sides a uniform fraction of the image's."""
    u = torch.rand(n, 4, generator=generator)
    box_h = (min_side + (max_side - min_side) * u[:, 0]) * height
    box_w = (min_side + (max_side - min_side) * u[:, 1]) * width
    top, left = u[:, 2] * (height - box_h), u[:, 3] * (width - box_w)
    ys = torch.arange(height).view(1, -1, 1) + 0.5
    xs = torch.arange(width).view(1, 1, -1) + 0.5
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + box_h).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + box_w).view(-1, 1, 1)))
    return inside.float().unsqueeze(1)


def stroke_masks(n: int, height: int, width: int, generator: torch.Generator | None = None,
                 max_strokes: int = 3, segments: int = 4, min_width: float = 0.06, max_width: float = 0.16) -> Tensor:
    """n x 1 x H x W masks of 1 to `max_strokes` thick polylines, each a random walk of `segments` steps."""
    side = float(min(height, width))
    ys = (torch.arange(height).view(-1, 1) + 0.5).expand(height, width)
    xs = (torch.arange(width).view(1, -1) + 0.5).expand(height, width)
    masks = torch.zeros(n, 1, height, width)
    for i in range(n):
        count = int(torch.randint(1, max_strokes + 1, (1,), generator=generator))
        for _ in range(count):
            radius = (min_width + (max_width - min_width) * float(torch.rand(1, generator=generator))) * side / 2
            point = torch.rand(2, generator=generator) * torch.tensor([height, width])
            for _ in range(segments):
                angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
                length = (0.15 + 0.25 * float(torch.rand(1, generator=generator))) * side
                end = point + length * torch.tensor([math.sin(angle), math.cos(angle)])
                end = torch.minimum(torch.maximum(end, torch.zeros(2)), torch.tensor([height, width], dtype=end.dtype))
                masks[i, 0] += _segment_distance(ys, xs, point, end) <= radius
                point = end
    return masks.clamp_(max=1.0)


def _segment_distance(ys: Tensor, xs: Tensor, start: Tensor, end: Tensor) -> Tensor:
    direction = end - start
    length2 = float(direction.square().sum()) or 1.0
    s = (((ys - start[0]) * direction[0] + (xs - start[1]) * direction[1]) / length2).clamp(0, 1)
    return ((ys - start[0] - s * direction[0]).square() + (xs - start[1] - s * direction[1]).square()).sqrt()


def random_masks(n: int, height: int, width: int, generator: torch.Generator | None = None,
                 p_whole: float = 0.25, p_box: float = 0.375) -> Tensor:
    """n x 1 x H x W masks in {0, 1} (1 = regenerate): the whole image with probability `p_whole` (the model
    also learns plain generation), else a box with probability `p_box`, else brush strokes."""
    kind = torch.rand(n, generator=generator)
    whole, box = kind < p_whole, (kind >= p_whole) & (kind < p_whole + p_box)
    masks = stroke_masks(n, height, width, generator)
    masks = torch.where(box.view(-1, 1, 1, 1), box_masks(n, height, width, generator), masks)
    return torch.where(whole.view(-1, 1, 1, 1), torch.ones_like(masks), masks)
