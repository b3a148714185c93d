"""Procedural shapes for training and testing the tiny SAM / SAM 2 checkpoints.

Replaces nothing in the reference packages: it is the data source of `scripts/train_tiny.py`
and of the tests that check the shipped checkpoints (`fastsam_core.models.tiny`). A scene is an
RGB image (H x W x 3 uint8) with a textured background and a few overlapping shapes (discs,
ellipses, rectangles, triangles, convex polygons, stars), each filled with a solid colour or a
two-colour texture, and the visible mask of each shape (what is left after the shapes painted
later cover it). Prompts follow SAM's conventions: points are (x, y) pixel indices, boxes are
(x0, y0, x1, y1) with inclusive pixel indices, as `segment_anything.utils.amg.batched_mask_to_box`.

Everything is driven by a `numpy.random.Generator`, so a seed gives the same scenes everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPE_KINDS = ("disc", "ellipse", "rectangle", "triangle", "polygon", "star")


@dataclass(frozen=True)
class Scene:
    """One generated image and its instances.

    Attributes:
        image: H x W x 3 uint8 RGB image.
        masks: K x H x W bool visible masks, one per kept instance, in painting order.
        kinds: K shape names, from `SHAPE_KINDS`.
    """

    image: np.ndarray
    masks: np.ndarray
    kinds: tuple[str, ...]


def make_scene(
    rng: np.random.Generator,
    height: int = 128,
    width: int | None = None,
    max_shapes: int = 6,
    min_area: float = 0.01,
) -> Scene:
    """Draw one scene.

    Args:
        rng: source of randomness.
        height, width: image size in pixels (width defaults to height).
        max_shapes: the number of painted shapes is uniform in [1, max_shapes].
        min_area: instances whose visible area is below this fraction of the image are dropped
            from `masks` (they stay painted); a scene always keeps at least one instance.

    Returns:
        A `Scene`.
    """
    width = height if width is None else width
    if height < 16 or width < 16:
        raise ValueError(f"height and width must be >= 16, got {height} x {width}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    while True:
        scene = _draw_scene(rng, height, width, max_shapes, min_area)
        if len(scene.kinds):
            return scene


def make_scenes(
    n: int, seed: int, height: int = 128, width: int | None = None, **kwargs: object
) -> list[Scene]:
    """`n` scenes from `numpy.random.default_rng(seed)`; kwargs go to `make_scene`."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, height, width, **kwargs) for _ in range(n)]


def sample_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A point drawn uniformly from the pixels of `mask` (H x W bool), as float (x, y)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask is empty")
    i = rng.integers(len(xs))
    return np.array([xs[i], ys[i]], dtype=np.float32)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """The tight box of `mask` (H x W bool) as float (x0, y0, x1, y1), inclusive indices."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("mask is empty")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def jitter_box(
    box: np.ndarray, rng: np.random.Generator, frac: float, height: int, width: int
) -> np.ndarray:
    """Move each side of `box` by N(0, frac * side length) pixels, clipped to the image.

    Args:
        box: (x0, y0, x1, y1).
        frac: noise standard deviation as a fraction of the box's width / height.

    Returns:
        The jittered box, float32 (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1.
    """
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    noise = rng.normal(0.0, frac, size=4) * np.array([w, h, w, h])
    out = box + noise
    out[[0, 2]] = np.clip(np.sort(out[[0, 2]]), 0, width - 1)
    out[[1, 3]] = np.clip(np.sort(out[[1, 3]]), 0, height - 1)
    return out.astype(np.float32)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape (1.0 when both are empty)."""
    union = np.logical_or(pred, target).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, target).sum() / union)


# ----------------------------------------------------------------------------- drawing


def _draw_scene(
    rng: np.random.Generator, height: int, width: int, max_shapes: int, min_area: float
) -> Scene:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _background(rng, xx, yy)
    bg_color = image.reshape(-1, 3).mean(0)
    colors: list[np.ndarray] = [bg_color]
    masks: list[np.ndarray] = []
    kinds: list[str] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        shape = _shape_mask(kind, rng, xx, yy)
        if not shape.any():
            continue
        color = _distinct_color(rng, colors)
        colors.append(color)
        fill = _fill(rng, color, xx, yy)
        image[shape] = fill[shape]
        for m in masks:
            m &= ~shape
        masks.append(shape)
        kinds.append(kind)
    keep = [i for i, m in enumerate(masks) if m.sum() >= min_area * height * width]
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    stacked = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, height, width), bool)
    return Scene(out, stacked, tuple(kinds[i] for i in keep))


def _distinct_color(
    rng: np.random.Generator, used: list[np.ndarray], min_dist: float = 70.0
) -> np.ndarray:
    """A random RGB colour at least `min_dist` (L2, 0-255 scale) from every colour in `used`."""
    best, best_d = None, -1.0
    for _ in range(30):
        c = rng.uniform(0, 255, size=3).astype(np.float32)
        d = min(float(np.linalg.norm(c - u)) for u in used)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _texture(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A texture in [0, 1], H x W: stripes, checkerboard, smooth blobs or a gradient."""
    kind = rng.integers(4)
    size = max(xx.shape)
    if kind == 0:  # stripes, random orientation and period
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.04, 0.2) * size
        t = np.cos(theta) * xx + np.sin(theta) * yy
        return 0.5 + 0.5 * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    if kind == 1:  # checkerboard
        cell = rng.uniform(0.03, 0.12) * size
        return ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    if kind == 2:  # smooth blobs: a coarse random grid, bilinearly upsampled
        g = int(rng.integers(3, 8))
        coarse = rng.uniform(0, 1, size=(g + 1, g + 1)).astype(np.float32)
        return _bilinear(coarse, xx / (xx.max() + 1) * g, yy / (yy.max() + 1) * g)
    theta = rng.uniform(0, 2 * np.pi)  # linear gradient
    t = np.cos(theta) * xx + np.sin(theta) * yy
    return (t - t.min()) / max(float(t.max() - t.min()), 1.0)


def _bilinear(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample `grid` (G x G) at fractional column `u` and row `v` (both H x W)."""
    u0 = np.clip(np.floor(u).astype(int), 0, grid.shape[1] - 2)
    v0 = np.clip(np.floor(v).astype(int), 0, grid.shape[0] - 2)
    fu, fv = u - u0, v - v0
    top = grid[v0, u0] * (1 - fu) + grid[v0, u0 + 1] * fu
    bottom = grid[v0 + 1, u0] * (1 - fu) + grid[v0 + 1, u0 + 1] * fu
    return top * (1 - fv) + bottom * fv


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """H x W x 3 float background: two colours mixed by a texture, plus pixel noise."""
    c0 = rng.uniform(0, 255, size=3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, 60, size=3), 0, 255).astype(np.float32)
    t = _texture(rng, xx, yy)[..., None]
    noise = rng.normal(0, rng.uniform(2, 12), size=xx.shape + (3,)).astype(np.float32)
    return c0 * (1 - t) + c1 * t + noise


def _fill(
    rng: np.random.Generator, color: np.ndarray, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """H x W x 3 float fill of a shape: mostly solid `color`, sometimes a two-colour texture."""
    noise = rng.normal(0, rng.uniform(0, 6), size=xx.shape + (3,)).astype(np.float32)
    if rng.uniform() < 0.7:
        return color + noise
    other = np.clip(color + rng.normal(0, 35, size=3), 0, 255).astype(np.float32)
    t = _texture(rng, xx, yy)[..., None]
    return color * (1 - t) + other * t + noise


def _shape_mask(kind: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """H x W bool mask of one random shape of type `kind`."""
    h, w = xx.shape
    side = min(h, w)
    r = rng.uniform(0.08, 0.3) * side
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    dx, dy = xx - cx, yy - cy
    theta = rng.uniform(0, np.pi)
    u = np.cos(theta) * dx + np.sin(theta) * dy  # rotated coordinates
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    if kind == "disc":
        return dx**2 + dy**2 <= r**2
    if kind == "ellipse":
        b = r * rng.uniform(0.35, 0.8)
        return (u / r) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "rectangle":
        a, b = r * rng.uniform(0.5, 1.0), r * rng.uniform(0.3, 1.0)
        if rng.uniform() < 0.5:  # axis-aligned half of the time
            u, v = dx, dy
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if kind in ("triangle", "polygon"):
        n = 3 if kind == "triangle" else int(rng.integers(5, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        # keep the gaps below pi so the polygon contains its centre and is not a sliver
        while np.max(np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))) > 0.8 * np.pi:
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        return _convex_polygon(np.cos(angles) * r + cx, np.sin(angles) * r + cy, xx, yy)
    if kind == "star":
        k = int(rng.integers(3, 7))
        amp = rng.uniform(0.2, 0.45)
        phi = np.arctan2(dy, dx)
        radius = r * (1 + amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))) / (1 + amp)
        return dx**2 + dy**2 <= radius**2
    raise ValueError(f"kind must be one of {SHAPE_KINDS}, got {kind!r}")


def _convex_polygon(px: np.ndarray, py: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """H x W bool: inside the convex polygon with vertices (px, py) in angular order."""
    inside = np.ones(xx.shape, dtype=bool)
    for i in range(len(px)):
        j = (i + 1) % len(px)
        cross = (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
        inside &= cross >= 0
    return inside
