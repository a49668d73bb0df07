"""The toy world's scenes: what one image of it shows, drawn procedurally from a seed.

Every image is a scene: one textured background with its own word (``TOY_BACKGROUNDS``: water, sky,
road, grass, wall, sand) and 1–3 objects of ten classes (``TOY_CLASSES``), each a shape with its own
colours and pattern, rotated, from small (≈3 ViT patches across) to large (two thirds of the image). Every class
has a home background it sits on most of the time (a boat on water, a car on road, a clock on a
wall: ``HOME_BACKGROUND``), the co-occurrence that CLIP-ES's background words are there to break.
Later objects occlude earlier ones, but never below ``MIN_VISIBLE`` of an object's own pixels, so
each labelled object can be seen and each object seen is labelled. Scene ``i`` of world ``seed`` is
drawn from its own random stream ``(seed, i)`` (:func:`render_scene`), so any slice can be drawn alone:
the dataset (:mod:`lightning_clipes.data.toy_world`) and the toy CLIP's caption stream
(:mod:`lightning_clipes.data.toy_captions`) use different indices of the same world.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOY_CLASSES: tuple[str, ...] = ("boat", "fish", "bird", "kite", "car", "cone", "ball", "flower", "window", "clock")
TOY_BACKGROUNDS: tuple[str, ...] = ("water", "sky", "road", "grass", "wall", "sand")
HOME_BACKGROUND: dict[str, str] = {
    "boat": "water", "fish": "water", "bird": "sky", "kite": "sky", "car": "road",
    "cone": "road", "ball": "grass", "flower": "grass", "window": "wall", "clock": "wall",
}
P_HOME = 0.8  # the first object's background is its home with this probability
HOME_WEIGHT = 10.0  # further objects: classes at home on the scene's background are this much likelier
NUM_OBJECTS_P = (0.4, 0.35, 0.25)  # 1, 2 or 3 objects
SIZE_RANGE = (0.1, 0.35)  # object half-extent as a fraction of the image side, log-uniform (was 0.06-0.3:
# objects of 1-2 patches made 92 % of the pixels background and the student could not learn them in minutes)
MIN_VISIBLE = 0.5  # an object keeps at least this fraction of its own pixels (else it is placed again)


@dataclass
class Scene:
    """One drawn scene.

    image: (S, S, 3) uint8 RGB. mask: (S, S) uint8 class ids (0 = background, ``1 + TOY_CLASSES.index``).
    objects: the objects in drawing order as (name, (xmin, ymin, xmax, ymax) of their visible
    pixels, 1-based inclusive). background: the background word. instances: (S, S) int64, the
    object index owning each pixel (-1 = background). areas: each object's own pixel count before
    later objects covered part of it.
    """

    image: np.ndarray
    mask: np.ndarray
    objects: list[tuple[str, tuple[int, int, int, int]]]
    background: str
    instances: np.ndarray
    areas: list[int]

    @property
    def labels(self) -> list[str]:
        """Class names of the visible objects, first appearance first, no repeats."""
        return list(dict.fromkeys(name for name, _ in self.objects))


# ------------------------------------------------------------------------------------ backgrounds
def _smooth(noise: np.ndarray, axis: int, width: int) -> np.ndarray:
    """Running mean of ``width`` samples along ``axis`` (wrapping), for streaky textures."""
    return sum(np.roll(noise, k, axis=axis) for k in range(width)) / width


def _background(rng: np.random.Generator, kind: str, s: int) -> np.ndarray:
    """(s, s, 3) float32 texture of a background kind, roughly in [0, 255]."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    jitter = rng.uniform(-12, 12, size=3).astype(np.float32)
    if kind == "grass":  # green with vertical blades
        blades = _smooth(rng.normal(0, 1, (s, s)).astype(np.float32), 0, 5)
        img = np.array([70, 145, 55], np.float32) + jitter + 45 * blades[..., None] * np.array([0.6, 1, 0.4])
    elif kind == "sky":  # blue gradient with soft clouds
        img = np.array([95, 160, 230], np.float32) + jitter + yy[..., None] * np.array([70, 50, 20], np.float32)
        for _ in range(int(rng.integers(0, 4))):
            cy, cx, ry, rx = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.12), rng.uniform(0.12, 0.3)
            cloud = np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))[..., None]
            img = img * (1 - 0.8 * cloud) + 0.8 * cloud * 245
    elif kind == "water":  # deep blue-green with horizontal waves
        period, phase = rng.uniform(0.05, 0.1), rng.uniform(0, 2 * np.pi)
        waves = np.sin(2 * np.pi * (yy + 0.03 * np.sin(2 * np.pi * xx * rng.uniform(2, 5) + phase)) / period)
        img = np.array([30, 95, 150], np.float32) + jitter + 30 * np.clip(waves, 0, 1)[..., None] ** 3
    elif kind == "road":  # dark asphalt with one dashed lane line
        img = np.array([75, 75, 80], np.float32) + jitter.mean() + rng.normal(0, 9, (s, s, 1)).astype(np.float32)
        lane, along = (yy, xx) if rng.random() < 0.5 else (xx, yy)
        line = (np.abs(lane - rng.uniform(0.2, 0.8)) < 0.02) & (np.mod(along + rng.uniform(), 0.25) < 0.15)
        img[line] = np.array([235, 215, 80], np.float32)
    elif kind == "wall":  # bricks with mortar lines, every other row shifted
        bh, bw = rng.uniform(0.06, 0.09), rng.uniform(0.14, 0.2)
        row = np.floor(yy / bh)
        shifted = xx / bw + 0.5 * (row % 2)
        brick_id = row * 97 + np.floor(shifted)
        shade = np.sin(brick_id * 12.9898) * 15
        img = np.array([165, 80, 60], np.float32) + jitter + shade[..., None]
        mortar = (np.mod(yy, bh) < 0.012) | (np.mod(shifted, 1.0) * bw < 0.012)
        img[mortar] = np.array([205, 195, 175], np.float32)
    elif kind == "sand":  # pale with dunes and speckles
        dunes = np.sin(2 * np.pi * (xx * rng.uniform(0.5, 1.5) + yy * rng.uniform(1, 3)))
        img = np.array([215, 190, 140], np.float32) + jitter + 12 * dunes[..., None]
        img = img + rng.normal(0, 7, (s, s, 1)).astype(np.float32)
    else:
        raise ValueError(f"Unknown background {kind!r}; expected one of {TOY_BACKGROUNDS}.")
    return img.astype(np.float32)


# ---------------------------------------------------------------------------------------- objects
def _rgb(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def _object(rng: np.random.Generator, name: str, u: np.ndarray, v: np.ndarray, px: float) -> tuple[np.ndarray, np.ndarray]:
    """Shape and colours of a class in local coordinates (u right, v down, the object within ±1).

    ``px`` is pixels per unit: textures repeat every few pixels whatever the object's size, so
    most 8-px patches of an object show its class's texture, not a flat colour.
    Returns (inside: bool array, colour: float32 array of shape u.shape + (3,)).
    """
    r = np.hypot(u, v)
    up, vp = u * px, v * px  # pixel units
    tint = rng.uniform(-15, 15, size=3).astype(np.float32)
    colour = np.zeros(u.shape + (3,), np.float32)
    if name == "boat":  # brown planked hull, red-and-white striped sail on a mast
        hull = (v > 0.15) & (v < 0.6) & (np.abs(u) < 0.95 - 0.7 * (v - 0.15))
        sail = (v > -0.9) & (v < 0.1) & (u > 0.05) & (u - 0.05 < 0.75 * (v + 0.9))
        mast = (np.abs(u) < 0.06) & (v > -0.95) & (v <= 0.15)
        inside = hull | sail | mast
        colour[:] = np.where((np.mod(up + vp, 8) < 4)[..., None], _rgb(235, 50, 50), _rgb(245, 240, 230))
        colour[hull] = _rgb(125, 70, 35) + tint
        colour[hull & (np.mod(vp, 4) < 1)] = _rgb(70, 40, 20)
        colour[mast] = _rgb(60, 40, 30)
    elif name == "fish":  # golden body with a grid of darker scales, tail fin, eye
        body = ((u + 0.2) / 0.7) ** 2 + (v / 0.42) ** 2 < 1
        tail = (u > 0.4) & (u < 0.95) & (np.abs(v) < 0.7 * (u - 0.4))
        inside = body | tail
        colour[:] = _rgb(250, 180, 30) + tint
        colour[(np.hypot(np.mod(up, 5) - 2.5, np.mod(vp, 5) - 2.5) < 1.3)] = _rgb(200, 100, 20)
        colour[np.hypot(u + 0.6, v + 0.1) < 0.08] = _rgb(20, 20, 20)
    elif name == "bird":  # dark gull: two wings in a shallow V and a white body
        wings = (np.abs(v - (0.55 * np.abs(u) - 0.35) + 0.25 * u ** 2) < 0.22) & (np.abs(u) < 0.95)
        body = (u / 0.25) ** 2 + ((v + 0.2) / 0.35) ** 2 < 1
        inside = wings | body
        colour[:] = _rgb(45, 45, 55) + tint / 2
        colour[body] = _rgb(230, 230, 230)
    elif name == "kite":  # diamond of small red and yellow checks
        inside = np.abs(u) / 0.65 + np.abs(v) < 0.95
        checks = (np.mod(up, 8) < 4) ^ (np.mod(vp, 8) < 4)
        colour[:] = np.where(checks[..., None], _rgb(225, 35, 45), _rgb(250, 215, 40)) + tint
    elif name == "car":  # red body, grey windows, black wheels
        body = (np.abs(u) < 0.95) & (v > -0.1) & (v < 0.4)
        cabin = (v > -0.55) & (v <= -0.1) & (np.abs(u) < 0.6 - 0.5 * (-0.1 - v))
        wheels = (np.hypot(np.abs(u) - 0.55, v - 0.4) < 0.23)
        inside = body | cabin | wheels
        colour[:] = _rgb(200, 30, 40) + tint
        colour[cabin & (np.abs(u) < 0.5 - 0.5 * (-0.1 - v)) & (v > -0.45)] = _rgb(170, 200, 215)
        colour[wheels] = _rgb(25, 25, 25)
    elif name == "cone":  # orange cone banded with white every few pixels, on a dark base
        cone = (v > -0.95) & (v < 0.75) & (np.abs(u) < 0.08 + 0.5 * (v + 0.95) / 1.7)
        base = (v >= 0.75) & (v < 0.95) & (np.abs(u) < 0.8)
        inside = cone | base
        colour[:] = _rgb(250, 110, 20) + tint
        colour[cone & (np.mod(vp, 8) < 3)] = _rgb(245, 245, 245)
        colour[base] = _rgb(50, 50, 50)
    elif name == "ball":  # white with small black spots
        inside = r < 0.9
        spots = np.sin(2 * np.pi * up / 9) * np.sin(2 * np.pi * vp / 9) > 0.5
        colour[:] = np.where(spots[..., None], _rgb(25, 25, 25), _rgb(245, 245, 245) + tint / 3)
    elif name == "flower":  # five pink petals round a yellow centre
        theta = np.arctan2(v, u)
        inside = r < 0.35 + 0.6 * np.abs(np.cos(2.5 * theta))
        colour[:] = _rgb(235, 85, 175) + tint
        colour[r < 0.3] = _rgb(250, 220, 40)
    elif name == "window":  # small light-blue panes in a white frame
        inside = (np.abs(u) < 0.85) & (np.abs(v) < 0.85)
        frame = (np.abs(u) > 0.72) | (np.abs(v) > 0.72) | (np.mod(up, 10) < 2) | (np.mod(vp, 10) < 2)
        colour[:] = np.where(frame[..., None], _rgb(240, 240, 235), _rgb(140, 195, 235) + tint)
    elif name == "clock":  # cream face with hour ticks, dark rim, two hands
        inside = r < 0.9
        angle = rng.uniform(0, 2 * np.pi)
        hand1 = (np.abs(u * np.sin(angle) - v * np.cos(angle)) < 0.07) & (u * np.cos(angle) + v * np.sin(angle) > 0) & (r < 0.6)
        hand2 = (np.abs(u) < 0.07) & (v < 0) & (r < 0.45)
        ticks = (r > 0.58) & (r < 0.7) & (np.mod(np.arctan2(v, u), np.pi / 6) < 0.12)
        colour[:] = _rgb(245, 240, 215) + tint / 3
        colour[(r > 0.75) | hand1 | hand2 | ticks] = _rgb(35, 35, 45)
    else:
        raise ValueError(f"Unknown toy class {name!r}; expected one of {TOY_CLASSES}.")
    return inside, colour


_UPRIGHT = {"boat": 0.2, "car": 0.2, "cone": 0.2, "window": 0.1, "clock": 0.1, "bird": 0.4, "kite": 0.5}


def _place(rng, name, size, instance, image, areas) -> bool:
    """Try to draw object ``len(areas)`` of class ``name`` (its pixel count goes to ``areas``); False,
    with nothing drawn, when it would leave an earlier object less than ``MIN_VISIBLE`` of its pixels."""
    s = size
    extent = np.exp(rng.uniform(np.log(SIZE_RANGE[0]), np.log(SIZE_RANGE[1]))) * s
    aspect = rng.uniform(0.8, 1.25)
    angle = rng.uniform(-1, 1) * _UPRIGHT.get(name, np.pi)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    cx, cy = rng.uniform(0.3 * extent, s - 0.3 * extent, size=2)  # may be cut by the border
    x0, x1 = max(0, int(cx - 1.5 * extent)), min(s, int(cx + 1.5 * extent) + 1)
    y0, y1 = max(0, int(cy - 1.5 * extent)), min(s, int(cy + 1.5 * extent) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = (xx + 0.5 - cx) / extent, (yy + 0.5 - cy) / extent
    u = flip * (np.cos(angle) * dx + np.sin(angle) * dy) / aspect
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) * aspect
    inside, colour = _object(rng, name, u, v, extent)
    if inside.sum() < 12:
        return False
    k = len(areas)
    window = instance[y0:y1, x0:x1]
    covered = np.bincount(window[inside & (window >= 0)], minlength=k)
    visible = np.bincount(instance[instance >= 0], minlength=k)
    if np.any((covered > 0) & (visible - covered < MIN_VISIBLE * np.asarray(areas))):
        return False
    # gentle lighting across the object and pixel noise, so no region is flat
    light = (0.12 * (u + v))[..., None] * colour
    colour = colour + light + rng.normal(0, 4, colour.shape).astype(np.float32)
    image[y0:y1, x0:x1][inside] = colour[inside]
    window[inside] = k
    areas.append(int(inside.sum()))
    return True


def render_background(seed: int, index: int, kind: str, size: int = 128) -> np.ndarray:
    """(size, size, 3) uint8: a background of ``kind`` with no object, with a scene's pixel noise
    (deterministic in ``seed, index``; a stream apart from scene ``index``'s)."""
    rng = np.random.default_rng([int(seed), int(index), 2])
    image = _background(rng, kind, size)
    return np.clip(np.rint(image + 3 * rng.standard_normal(image.shape, dtype=np.float32)), 0, 255).astype(np.uint8)


def render_scene(seed: int, index: int, size: int = 128, p_home: float = P_HOME, home_weight: float = HOME_WEIGHT) -> Scene:
    """Draw scene ``index`` of the world ``seed`` at ``size`` × ``size`` pixels (deterministic).

    ``p_home`` and ``home_weight`` set the co-occurrence of classes and backgrounds (see ``P_HOME``);
    ``p_home = 1/6, home_weight = 1`` draws backgrounds independently of the objects."""
    rng = np.random.default_rng([int(seed), int(index)])
    first = TOY_CLASSES[int(rng.integers(len(TOY_CLASSES)))]
    home = HOME_BACKGROUND[first]
    others = [b for b in TOY_BACKGROUNDS if b != home]
    background = home if rng.random() < p_home else others[int(rng.integers(len(others)))]
    image = _background(rng, background, size)
    weights = np.array([home_weight if HOME_BACKGROUND[c] == background else 1.0 for c in TOY_CLASSES])
    count = 1 + int(rng.choice(len(NUM_OBJECTS_P), p=NUM_OBJECTS_P))
    names = [first] + [TOY_CLASSES[int(i)] for i in rng.choice(len(TOY_CLASSES), size=count - 1, p=weights / weights.sum())]
    instance = np.full((size, size), -1, np.int64)
    drawn: list[str] = []
    areas: list[int] = []
    for j, name in enumerate(names):
        for _ in range(100 if j == 0 else 10):  # the first object always finds a place
            if _place(rng, name, size, instance, image, areas):
                drawn.append(name)
                break
    mask = np.zeros((size, size), np.uint8)
    objects = []
    for k, name in enumerate(drawn):
        ys, xs = np.nonzero(instance == k)
        mask[ys, xs] = TOY_CLASSES.index(name) + 1
        objects.append((name, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    image = np.clip(np.rint(image + 3 * rng.standard_normal(image.shape, dtype=np.float32)), 0, 255).astype(np.uint8)
    return Scene(image=image, mask=mask, objects=objects, background=background, instances=instance, areas=areas)
