"""Generated pedestrian data in the on-disk formats of the real datasets.

The real datasets cannot be downloaded everywhere, so the demo, the tests and
the benchmarks run on data drawn here: pedestrian-like crops (background of a
camera view, a person with hair, upper and lower clothing, shoes, optional bag
and hat) and captions written from the same attributes, so every caption is
true of its image. Clothing colours cover large areas so that a small model
trained for minutes at low resolution can learn to retrieve by them.

Everything about identity ``pid`` is drawn from ``(seed, pid)`` and everything
about its ``k``-th image from ``(seed, pid, k)``: the same command gives
byte-identical JSON and images, and the first identities do not change when
``num_ids`` grows.

    python -m datasets.synth --root data --format cuhk --num_ids 300 --seed 0
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

MARKER_FILE = "SYNTHETIC.json"


@dataclasses.dataclass(frozen=True)
class SynthFormat:
    """How one real dataset lays out its files (annotation JSON, image folder, fields)."""
    folder: str
    annotation: str
    path_field: str
    splits: tuple[str, ...]
    captions_per_image: int
    image_ext: str
    processed_tokens: bool
    images_per_id: tuple[int, int]      # inclusive range per identity
    split_fractions: tuple[float, ...]  # one per split, in `splits` order


FORMATS = {
    "cuhk": SynthFormat("CUHK-PEDES", "reid_raw.json", "file_path", ("train", "val", "test"),
                        2, ".png", True, (2, 4), (0.7, 0.15, 0.15)),
    "icfg": SynthFormat("ICFG-PEDES", "ICFG_PEDES.json", "file_path", ("train", "test"),
                        1, ".jpg", True, (3, 6), (0.75, 0.25)),
    "rstp": SynthFormat("RSTPReid", "data_captions.json", "img_path", ("train", "val", "test"),
                        2, ".jpg", False, (5, 5), (0.7, 0.15, 0.15)),
}
FORMAT_OF_DATASET = {"CUHK-PEDES": "cuhk", "ICFG-PEDES": "icfg", "RSTPReid": "rstp"}

# ---------------------------------------------------------------------------
# Attribute vocabulary. Each colour has an RGB value and the words captions use.
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((28, 28, 32), ("black",)),
    "white": ((236, 236, 232), ("white",)),
    "gray": ((128, 128, 130), ("gray", "grey")),
    "red": ((205, 32, 38), ("red",)),
    "blue": ((36, 72, 200), ("blue",)),
    "navy": ((28, 36, 92), ("dark blue", "navy")),
    "light blue": ((132, 184, 235), ("light blue", "sky blue")),
    "green": ((36, 145, 62), ("green",)),
    "yellow": ((240, 210, 40), ("yellow",)),
    "orange": ((245, 130, 28), ("orange",)),
    "pink": ((245, 152, 194), ("pink",)),
    "purple": ((122, 50, 155), ("purple",)),
    "brown": ((112, 70, 38), ("brown",)),
    "khaki": ((196, 176, 124), ("khaki", "beige")),
}
UPPER_COLOURS = list(COLOURS)
LOWER_COLOURS = ["black", "black", "gray", "navy", "blue", "khaki", "white", "brown", "red", "green", "pink"]
JEANS_COLOURS = ["blue", "blue", "light blue", "black", "navy"]
SHOE_COLOURS = ["black", "black", "white", "white", "brown", "gray", "red", "blue"]
BAG_COLOURS = ["black", "black", "brown", "red", "blue", "gray", "pink", "green", "white", "yellow"]
HAT_COLOURS = ["black", "white", "red", "blue", "gray", "yellow"]
HAIR_COLOURS = {
    "black": ((22, 20, 20), ("black", "dark")),
    "brown": ((92, 58, 32), ("brown",)),
    "blonde": ((214, 180, 104), ("blonde", "blond")),
    "gray": ((168, 166, 162), ("gray", "grey")),
}
SKIN_TONES = [(246, 214, 188), (232, 190, 150), (205, 156, 112), (164, 112, 74), (112, 74, 48)]

UPPER_TYPES = {  # name: caption words
    "t-shirt": ("t-shirt", "short-sleeved shirt", "tee shirt"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt"),
    "sweater": ("sweater", "jumper", "pullover"),
    "jacket": ("jacket", "zip-up jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "dress": ("dress",),
}
LOWER_TYPES = {
    "trousers": ("trousers", "pants", "slacks"),
    "jeans": ("jeans", "denim pants"),
    "shorts": ("shorts",),
    "skirt": ("skirt",),
}
SHOE_TYPES = {"shoes": ("shoes",), "sneakers": ("sneakers", "trainers"), "boots": ("boots",)}
BAG_TYPES = {"backpack": ("backpack",), "handbag": ("handbag", "purse"),
             "shoulder bag": ("shoulder bag", "bag over the shoulder")}
HAT_TYPES = {"cap": ("cap", "baseball cap"), "beanie": ("beanie", "knit hat")}
HAIR_STYLES = ("short", "long", "ponytail", "bald")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Attributes that stay fixed across all images of one person."""
    pid: int
    gender: str          # "man" | "woman"
    skin: tuple[int, int, int]
    hair_style: str
    hair_colour: str
    upper: str
    upper_colour: str
    lower: str | None    # None with a dress
    lower_colour: str | None
    shoes: str
    shoe_colour: str
    bag: str | None
    bag_colour: str | None
    hat: str | None
    hat_colour: str | None
    build: float         # shoulder-width factor


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def draw_identity(seed: int, pid: int) -> Identity:
    """The attributes of person ``pid`` (a function of ``(seed, pid)`` only)."""
    rng = np.random.default_rng([seed, 1, pid])
    gender = "woman" if rng.random() < 0.5 else "man"
    if gender == "woman":
        hair_style = _pick(rng, ["long", "long", "ponytail", "short"])
        upper = _pick(rng, ["t-shirt", "shirt", "sweater", "jacket", "coat", "dress", "dress"])
    else:
        hair_style = _pick(rng, ["short", "short", "short", "bald"])
        upper = _pick(rng, ["t-shirt", "t-shirt", "shirt", "sweater", "jacket", "coat"])
    hair_colour = _pick(rng, ["black", "black", "black", "brown", "brown", "blonde", "gray"])
    upper_colour = _pick(rng, UPPER_COLOURS)
    if upper == "dress":
        lower, lower_colour = None, None
    else:
        # A coat would hide shorts or a skirt (and the caption would name something invisible).
        lower = _pick(rng, ["trousers", "trousers", "jeans", "jeans"] if upper == "coat" else
                      ["trousers", "trousers", "jeans", "jeans", "shorts"]
                      + (["skirt", "skirt"] if gender == "woman" else []))
        palette = JEANS_COLOURS if lower == "jeans" else LOWER_COLOURS
        lower_colour = _pick(rng, [c for c in palette if c != upper_colour])
    shoes = _pick(rng, list(SHOE_TYPES))
    shoe_colour = _pick(rng, SHOE_COLOURS)
    bag = _pick(rng, [None, None, "backpack", "backpack", "handbag", "shoulder bag"])
    bag_colour = _pick(rng, [c for c in BAG_COLOURS if c != upper_colour]) if bag else None
    hat = _pick(rng, [None] * 5 + ["cap", "beanie"])
    hat_colour = _pick(rng, HAT_COLOURS) if hat else None
    skin = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))]
    build = float(rng.uniform(0.9, 1.1)) * (1.08 if gender == "man" else 0.95)
    return Identity(pid, gender, skin, hair_style, hair_colour, upper, upper_colour, lower,
                    lower_colour, shoes, shoe_colour, bag, bag_colour, hat, hat_colour, build)


# ---------------------------------------------------------------------------
# Drawing. The person is described in "body units": height 1 from the top of
# the head (y=0) to the soles (y=1), x=0 on the body axis, +x to the image
# right before any flip. A per-image affine map places it in the crop.

def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return list(zip((cx + rx * np.cos(t)).tolist(), (cy + ry * np.sin(t)).tolist()))


def _limb(p0: tuple[float, float], p1: tuple[float, float], w0: float, w1: float) -> list[tuple[float, float]]:
    """Quadrilateral around the segment p0->p1, half-widths w0 at p0 and w1 at p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    norm = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / norm, dx / norm
    return [(p0[0] + nx * w0, p0[1] + ny * w0), (p1[0] + nx * w1, p1[1] + ny * w1),
            (p1[0] - nx * w1, p1[1] - ny * w1), (p0[0] - nx * w0, p0[1] - ny * w0)]


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _shade(rgb: Sequence[float], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * factor)))) for c in rgb)


def _jitter_colour(rng: np.random.Generator, rgb: Sequence[int], amount: float = 10.0) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c + d)))) for c, d in zip(rgb, rng.normal(0.0, amount, 3)))


def _person_shapes(person: Identity, rng: np.random.Generator, back_view: bool) -> list[tuple[list, tuple]]:
    """Polygons (body units) with their fill colours, in painting order."""
    col = {name: _jitter_colour(rng, rgb, 8.0) for name, (rgb, _) in COLOURS.items()}
    skin = _jitter_colour(rng, person.skin, 6.0)
    hair = _jitter_colour(rng, HAIR_COLOURS[person.hair_colour][0], 6.0)
    upper = col[person.upper_colour]
    shapes: list[tuple[list, tuple]] = []

    sw = 0.105 * person.build            # shoulder half-width
    waist, hip = 0.082 * person.build, 0.092 * person.build
    swing = float(rng.uniform(-0.045, 0.045))    # arm swing (walking phase)
    stride = float(rng.uniform(0.0, 0.09))        # feet apart
    shoulder_y, hip_y = 0.17, 0.52

    # Arms: shoulder -> elbow -> wrist, on both sides.
    arms = []
    for side in (-1, 1):
        s = (side * (sw - 0.012), shoulder_y + 0.01)
        e = (side * (sw + 0.028), 0.33)
        w = (side * (sw + 0.036) + side * 0.3 * swing + swing * 0.5, 0.47)
        arms.append((s, e, w))
    # Legs: hip joint -> knee -> ankle.
    legs = []
    for side in (-1, 1):
        h = (side * 0.047, hip_y)
        k = (side * (0.05 + stride * 0.45), 0.74)
        a = (side * (0.05 + stride), 0.95)
        legs.append((h, k, a))

    # Backpack body is behind the torso in a front view: draw it first.
    if person.bag == "backpack" and not back_view:
        shapes.append(([(-sw - 0.03, 0.2), (sw + 0.03, 0.2), (sw + 0.03, 0.44), (-sw - 0.03, 0.44)],
                       _shade(col[person.bag_colour], 0.85)))
    # Long hair hangs behind the shoulders in a front view.
    if person.hair_style == "long" and not back_view:
        shapes.append(([(-0.075, 0.06), (0.075, 0.06), (0.085, 0.27), (-0.085, 0.27)], hair))

    # Legs (skin first; clothing painted over it).
    for h, k, a in legs:
        shapes.append((_limb(h, k, 0.045, 0.036), skin))
        shapes.append((_ellipse(k[0], k[1], 0.036, 0.036, 12), skin))
        shapes.append((_limb(k, a, 0.036, 0.027), skin))
    lower_end = {"trousers": 0.95, "jeans": 0.95, "shorts": 0.64, "skirt": None, None: None}[person.lower]
    if person.lower in ("trousers", "jeans", "shorts"):
        lower = col[person.lower_colour]
        for h, k, a in legs:
            if lower_end > 0.74:
                shapes.append((_limb(h, k, 0.05, 0.041), lower))
                shapes.append((_ellipse(k[0], k[1], 0.041, 0.041, 12), lower))  # no gap at the knee
                shapes.append((_limb(k, a, 0.041, 0.033), lower))
            else:
                shapes.append((_limb(h, _lerp(h, k, (lower_end - hip_y) / (0.74 - hip_y)), 0.052, 0.046), lower))
        # Crotch: fill between the legs below the hips.
        shapes.append(([(-hip, hip_y - 0.02), (hip, hip_y - 0.02), (0.02, hip_y + 0.07), (-0.02, hip_y + 0.07)],
                       lower))
    # Shoes.
    shoe = col[person.shoe_colour]
    for side, (_, _, a) in zip((-1, 1), legs):
        top = 0.88 if person.shoes == "boots" else 0.94
        if person.shoes == "boots":
            shapes.append((_limb((a[0], top), (a[0], 0.97), 0.034, 0.034), shoe))
        toe = 0.0 if back_view else side * 0.012
        shapes.append((_ellipse(a[0] + toe, 0.975, 0.036, 0.026), shoe))

    # Torso garment. A coat reaches the thighs, a dress the knees.
    hem = {"coat": 0.74, "dress": 0.76}.get(person.upper, hip_y + 0.02)
    flare = {"coat": 0.02, "dress": 0.05}.get(person.upper, 0.0)
    torso = [(-sw, shoulder_y), (-0.04, shoulder_y - 0.015), (0.04, shoulder_y - 0.015), (sw, shoulder_y),
             (waist + 0.005, 0.42), (hip + flare, hem), (-hip - flare, hem), (-waist - 0.005, 0.42)]
    if person.lower == "skirt":
        lower = col[person.lower_colour]
        shapes.append(([(-hip, hip_y - 0.04), (hip, hip_y - 0.04), (hip + 0.04, 0.71), (-hip - 0.04, 0.71)], lower))
    shapes.append((torso, upper))
    # Garment details: a jacket's zip line, a shirt's collar, a coat's buttons.
    dark = _shade(upper, 0.6)
    light = _shade(upper, 1.25)
    if not back_view:
        if person.upper in ("jacket", "coat"):
            shapes.append(([(-0.006, shoulder_y), (0.006, shoulder_y), (0.006, hem), (-0.006, hem)], dark))
        if person.upper == "shirt":
            shapes.append(([(-0.04, shoulder_y - 0.015), (0.0, shoulder_y + 0.04), (0.04, shoulder_y - 0.015),
                            (0.0, shoulder_y + 0.01)], light))
    if person.upper in ("t-shirt", "sweater", "shirt", "jacket"):
        shapes.append(([(-waist - 0.008, hip_y - 0.01), (waist + 0.008, hip_y - 0.01), (waist + 0.008, hip_y + 0.01),
                        (-waist - 0.008, hip_y + 0.01)], dark))

    # Arms: sleeves over skin. Dresses and t-shirts have short sleeves.
    short_sleeve = person.upper in ("t-shirt", "dress")
    for s, e, w in arms:
        shapes.append((_limb(s, e, 0.03, 0.026), upper))
        if short_sleeve:
            shapes.append((_limb(_lerp(s, e, 0.55), e, 0.024, 0.022), skin))
            shapes.append((_ellipse(e[0], e[1], 0.022, 0.022, 12), skin))
            shapes.append((_limb(e, w, 0.022, 0.018), skin))
        else:
            shapes.append((_ellipse(e[0], e[1], 0.026, 0.026, 12), upper))
            shapes.append((_limb(e, w, 0.026, 0.021), upper))
        shapes.append((_ellipse(w[0], w[1] + 0.018, 0.02, 0.025), skin))

    # Bags in front of the body.
    if person.bag:
        bag = col[person.bag_colour]
        if person.bag == "backpack":
            if back_view:
                shapes.append(([(-0.07, 0.2), (0.07, 0.2), (0.078, 0.44), (-0.078, 0.44)], bag))
                shapes.append(([(-0.06, 0.34), (0.06, 0.34), (0.062, 0.42), (-0.062, 0.42)], _shade(bag, 0.75)))
            else:
                for side in (-1, 1):
                    shapes.append((_limb((side * 0.07, shoulder_y), (side * 0.075, 0.37), 0.013, 0.013), bag))
        elif person.bag == "handbag":
            _, _, w = arms[1]
            shapes.append(([(w[0] - 0.04, w[1] + 0.03), (w[0] + 0.045, w[1] + 0.03), (w[0] + 0.05, w[1] + 0.13),
                            (w[0] - 0.045, w[1] + 0.13)], bag))
            shapes.append((_limb((w[0] - 0.02, w[1] + 0.035), (w[0], w[1]), 0.006, 0.006), _shade(bag, 0.7)))
        else:  # shoulder bag: strap across the chest, bag at the opposite hip
            shapes.append((_limb((-sw + 0.02, shoulder_y + 0.005), (sw + 0.01, 0.47), 0.012, 0.012), bag))
            shapes.append(([(sw - 0.03, 0.44), (sw + 0.07, 0.44), (sw + 0.07, 0.55), (sw - 0.03, 0.55)], bag))

    # Neck and head.
    shapes.append(([(-0.022, 0.1), (0.022, 0.1), (0.025, shoulder_y), (-0.025, shoulder_y)], skin))
    head = (0.0, 0.072, 0.05, 0.068)
    if back_view and person.hair_style != "bald":
        shapes.append((_ellipse(*head), hair))
        if person.hair_style == "long":
            shapes.append(([(-0.06, 0.07), (0.06, 0.07), (0.07, 0.27), (-0.07, 0.27)], hair))
    else:
        shapes.append((_ellipse(*head), skin))
        if person.hair_style in ("short", "long", "ponytail"):
            # A cap of hair over the top of the head.
            t = np.linspace(math.pi, 2 * math.pi, 14)
            cap = list(zip((0.054 * np.cos(t)).tolist(), (0.066 + 0.07 * np.sin(t)).tolist()))
            shapes.append((cap + [(0.05, 0.05), (0.03, 0.035), (-0.03, 0.035), (-0.05, 0.05)], hair))
        if person.hair_style == "long":
            for side in (-1, 1):
                shapes.append((_limb((side * 0.05, 0.05), (side * 0.058, 0.2), 0.016, 0.013), hair))
    if person.hair_style == "ponytail":
        shapes.append((_limb((0.0, 0.05), (0.0, 0.2), 0.02, 0.012) if back_view
                       else _limb((0.05, 0.06), (0.075, 0.16), 0.014, 0.01), hair))
    if person.hat:
        hat = col[person.hat_colour]
        t = np.linspace(math.pi, 2 * math.pi, 14)
        dome = list(zip((0.057 * np.cos(t)).tolist(), (0.055 + 0.062 * np.sin(t)).tolist()))
        shapes.append((dome, hat))
        if person.hat == "cap" and not back_view:
            shapes.append(([(-0.05, 0.05), (0.085, 0.05), (0.085, 0.062), (-0.05, 0.062)], _shade(hat, 0.8)))
        if person.hat == "beanie":
            shapes.append(([(-0.057, 0.045), (0.057, 0.045), (0.057, 0.06), (-0.057, 0.06)], _shade(hat, 0.8)))
    return shapes


def _camera_style(seed: int, camera: int) -> dict:
    """Background style of one camera view (fixed per camera, like real ReID data)."""
    rng = np.random.default_rng([seed, 3, camera])
    wall = rng.uniform(70, 190, 3) * rng.uniform(0.85, 1.0, 3)
    wall = wall.mean() * 0.6 + wall * 0.4      # keep backgrounds desaturated
    ground = rng.uniform(60, 170) + rng.uniform(-12, 12, 3)
    return {"wall": wall, "ground": ground, "horizon": float(rng.uniform(0.45, 0.7)),
            "stripes": int(rng.integers(0, 4)), "windows": bool(rng.random() < 0.5),
            "tint": rng.uniform(0.95, 1.05, 3)}


def draw_image(person: Identity, seed: int, k: int, camera: int) -> tuple[Image.Image, bool]:
    """The ``k``-th crop of ``person`` seen by ``camera``. Returns (RGB image, back_view)."""
    rng = np.random.default_rng([seed, 2, person.pid, k])
    width = int(rng.integers(56, 161))
    height = int(round(width * rng.uniform(2.3, 3.0)))
    ss = 2  # supersampling factor: draw at twice the size, then downsample (anti-aliasing)
    W, H = width * ss, height * ss
    style = _camera_style(seed, camera)

    # Background: wall with vertical gradient above the horizon, ground below.
    ys = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None]
    horizon = style["horizon"] + rng.uniform(-0.05, 0.05)
    wall = style["wall"][None, :] * (1.1 - 0.25 * ys)
    ground = style["ground"][None, :] * (0.85 + 0.3 * ys)
    column = np.clip(np.where(ys < horizon, wall, ground), 0, 255).astype(np.uint8)  # H, 3
    canvas = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column[:, None, :], (H, W, 3))), "RGB")
    draw = ImageDraw.Draw(canvas)
    # Scenery: windows / doors on the wall, kerb lines on the ground, a pole.
    if style["windows"]:
        for _ in range(int(rng.integers(1, 4))):
            x0 = rng.uniform(-0.2, 0.9) * W
            y0 = rng.uniform(0.0, horizon - 0.2) * H
            shade = _shade(style["wall"], float(rng.uniform(0.55, 0.8)))
            draw.rectangle([x0, y0, x0 + rng.uniform(0.2, 0.5) * W, y0 + rng.uniform(0.08, 0.2) * H], fill=shade)
    for i in range(style["stripes"]):
        y = (horizon + (i + 1) * (1 - horizon) / (style["stripes"] + 1) + rng.uniform(-0.02, 0.02)) * H
        draw.rectangle([0, y, W, y + 0.006 * H], fill=_shade(style["ground"], 1.25))
    if rng.random() < 0.3:
        x = rng.uniform(0.0, 1.0) * W
        draw.rectangle([x, 0, x + 0.04 * W, horizon * H + 0.05 * H], fill=_shade(style["wall"], 0.45))

    # Person placement: scale, translation, lean; front or back view; mirror.
    back_view = bool(rng.random() < 0.4)
    body_h = H * rng.uniform(0.82, 0.95)
    top = rng.uniform(0.02, 1.0) * (H - body_h) * 0.8 + 0.01 * H
    cx = W * (0.5 + rng.uniform(-0.07, 0.07))
    lean = rng.uniform(-0.06, 0.06)
    xscale = body_h * rng.uniform(0.95, 1.12)   # camera aspect / pose width jitter
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    # Ground shadow under the feet.
    sx = cx + lean * body_h * 1.0
    draw.ellipse([sx - 0.16 * xscale, top + 0.96 * body_h, sx + 0.16 * xscale, top + 1.01 * body_h],
                 fill=_shade(style["ground"], 0.6))

    def to_pixels(points):
        return [(cx + mirror * x * xscale + lean * y * body_h, top + y * body_h) for x, y in points]

    for polygon, colour in _person_shapes(person, rng, back_view):
        draw.polygon(to_pixels(polygon), fill=colour)

    image = canvas.resize((width, height), Image.BOX)
    # Lighting (camera colour cast and exposure), sensor noise, slight blur.
    pixels = np.asarray(image, dtype=np.float32)
    gain = style["tint"] * rng.uniform(0.82, 1.15)
    pixels = pixels * gain[None, None, :].astype(np.float32) + rng.normal(0.0, 4.0, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    return image, back_view


# ---------------------------------------------------------------------------
# Captions: attribute phrases with synonyms, assembled by several templates.

def _colour_word(rng: np.random.Generator, colour: str) -> str:
    return _pick(rng, COLOURS[colour][1])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _upper_phrase(rng, p: Identity, last: bool) -> str:
    noun = _pick(rng, UPPER_TYPES[p.upper])
    colour = _colour_word(rng, p.upper_colour)
    if last and rng.random() < 0.3:  # only last in a list, or "that is red and ..." would blur items
        return f"{_article(noun)} {noun} that is {colour}"
    return f"{_article(colour)} {colour} {noun}"


def _lower_phrase(rng, p: Identity) -> str:
    noun = _pick(rng, LOWER_TYPES[p.lower])
    colour = _colour_word(rng, p.lower_colour)
    if p.lower == "skirt":
        return f"{_article(colour)} {colour} {noun}"
    return _pick(rng, [f"{colour} {noun}", f"a pair of {colour} {noun}"])


def _shoe_phrase(rng, p: Identity) -> str:
    noun = _pick(rng, SHOE_TYPES[p.shoes])
    colour = _colour_word(rng, p.shoe_colour)
    return _pick(rng, [f"{colour} {noun}", f"a pair of {colour} {noun}"])


def _hair_phrase(rng, p: Identity) -> str:
    colour = _pick(rng, HAIR_COLOURS[p.hair_colour][1])
    if p.hair_style == "bald":
        return "a bald head"
    if p.hair_style == "ponytail":
        return _pick(rng, [f"{colour} hair in a ponytail", f"{colour} hair tied back in a ponytail"])
    return f"{p.hair_style} {colour} hair"


def _bag_phrase(rng, p: Identity, pronoun_pos: str) -> str:
    noun = _pick(rng, BAG_TYPES[p.bag])
    colour = _colour_word(rng, p.bag_colour)
    if p.bag == "backpack":
        return _pick(rng, [f"carrying {_article(colour)} {colour} {noun}",
                           f"with {_article(colour)} {colour} {noun} on {pronoun_pos} back"])
    if p.bag == "handbag":
        return _pick(rng, [f"carrying {_article(colour)} {colour} {noun}",
                           f"holding {_article(colour)} {colour} {noun} in {pronoun_pos} hand"])
    return f"carrying {_article(colour)} {colour} {noun}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def write_caption(person: Identity, rng: np.random.Generator, back_view: bool) -> str:
    """One caption of ``person``: every attribute it names is drawn in the image."""
    woman = person.gender == "woman"
    he, his = ("she", "her") if woman else ("he", "his")
    noun = _pick(rng, ["woman", "woman", "lady", "female", "girl"] if woman else ["man", "man", "male", "guy"])
    subject = _pick(rng, ["a", "the", "this"]) + " " + ("young " if rng.random() < 0.1 else "") + noun

    clothes = []
    if person.lower and rng.random() < 0.95:
        clothes.append(_lower_phrase(rng, person))
    if rng.random() < 0.55:
        clothes.append(_shoe_phrase(rng, person))
    clothes.insert(0, _upper_phrase(rng, person, last=not clothes))
    if person.hat and rng.random() < 0.7:
        colour = _colour_word(rng, person.hat_colour)
        clothes.insert(0, f"{_article(colour)} {colour} {_pick(rng, HAT_TYPES[person.hat])}")
    hair = _hair_phrase(rng, person) if rng.random() < 0.5 and not person.hat else None
    bag = _bag_phrase(rng, person, his) if person.bag and rng.random() < 0.85 else None
    wears = _pick(rng, ["is wearing", "wears", "is dressed in", "has on"])

    template = int(rng.integers(4))
    if template == 0:    # "A man wearing a red t-shirt and black trousers, carrying a blue backpack."
        text = f"{subject} {_pick(rng, ['wearing', 'dressed in'])} {_join(clothes)}"
        text = _sentence(text + (f", {bag}" if bag else ""))
        if hair:
            text += " " + _sentence(f"{he} has {hair}")
    elif template == 1:  # "The woman has long brown hair and wears ... She is carrying ..."
        text = _sentence(f"{subject} {'has ' + hair + ' and ' if hair else ''}{wears} {_join(clothes)}")
        if bag:
            text += " " + _sentence(f"{he} is {bag}" if bag.startswith(("carrying", "holding"))
                                    else f"{he} walks {bag}")
    elif template == 2:  # "A man in a gray coat and blue jeans with short black hair."
        text = f"{subject} in {_join(clothes)}" + (f" with {hair}" if hair else "") + (f", {bag}" if bag else "")
        text = _sentence(text)
    else:                # item by item, as the longer ICFG-PEDES captions do
        parts = [_sentence(f"{subject} is wearing {clothes[0]}")]
        if len(clothes) > 1:
            parts.append(_sentence(f"{he} also {_pick(rng, ['wears', 'has on'])} {_join(clothes[1:])}"))
        if hair:
            parts.append(_sentence(f"{he} has {hair}"))
        if bag:
            parts.append(_sentence(f"{he} is {bag}" if bag.startswith(("carrying", "holding"))
                                   else f"{he} is walking {bag}"))
        text = " ".join(parts)
    if back_view and rng.random() < 0.3:
        text += " " + _sentence(f"{he} is walking away from the camera")
    return text


def processed_tokens(caption: str) -> list[str]:
    """Lower-cased word list, as in the ``processed_tokens`` field of the real files."""
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", caption.lower())


# ---------------------------------------------------------------------------
# Writing a dataset.

def split_identities(num_ids: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Assign ids 1..num_ids to the splits (at least one id each), shuffled by ``seed``."""
    if num_ids < len(fractions):
        raise ValueError(f"num_ids={num_ids}: need at least one identity for each of {len(fractions)} splits.")
    total = float(sum(fractions))
    counts = [max(1, int(round(num_ids * f / total))) for f in fractions[1:]]
    counts = [num_ids - sum(counts)] + counts
    if counts[0] < 1:
        raise ValueError(f"num_ids={num_ids} with split fractions {tuple(fractions)} leaves no training identity.")
    ids = np.random.default_rng([seed, 0]).permutation(np.arange(1, num_ids + 1)).tolist()
    out, start = [], 0
    for n in counts:
        out.append(sorted(ids[start:start + n]))
        start += n
    return out


def _image_name(fmt: str, split: str, pid: int, k: int, camera: int) -> str:
    if fmt == "cuhk":
        return f"CUHK01/{pid:04d}{k:03d}.png"
    if fmt == "icfg":
        return f"{split}/{pid:04d}/{pid:04d}_c{camera:02d}_{k:04d}.jpg"
    return f"{pid:04d}_c{camera}_{k:04d}.jpg"


def _encode(image: Image.Image, ext: str) -> bytes:
    buffer = io.BytesIO()
    if ext == ".png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def generate(root: str | os.PathLike, fmt: str, num_ids: int, seed: int = 0,
             images_per_id: tuple[int, int] | None = None,
             split_fractions: Sequence[float] | None = None,
             num_cameras: int = 6) -> str:
    """Write a synthetic dataset in the on-disk format ``fmt`` under ``root``.

    Args:
        root: folder that will hold the dataset folder (``{root}/CUHK-PEDES`` ...).
        fmt: "cuhk" | "icfg" | "rstp".
        num_ids: identities (ids 1..num_ids), split train/val/test by identity.
        images_per_id: inclusive (min, max) images per identity; format default if None.
        split_fractions: fraction of identities per split, in the format's split
            order (train, val, test; ICFG-PEDES: train, test).
        num_cameras: camera views; each has its own background style.

    Returns: the dataset folder. The annotation file is written last (through
    a temporary file), so a folder without it is an interrupted generation.
    Refuses to write into a non-empty folder that it did not generate.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown synthetic format {fmt!r}; choose one of {sorted(FORMATS)}.")
    spec = FORMATS[fmt]
    root = os.fspath(root)
    images_per_id = tuple(images_per_id or spec.images_per_id)
    if len(images_per_id) != 2 or not 1 <= images_per_id[0] <= images_per_id[1]:
        raise ValueError(f"images_per_id={images_per_id}: expected (min, max) with 1 <= min <= max.")
    fractions = tuple(split_fractions or spec.split_fractions)
    if len(fractions) != len(spec.splits) or min(fractions) <= 0:
        raise ValueError(f"split_fractions={fractions}: expected {len(spec.splits)} positive fractions "
                         f"for the splits {spec.splits}.")
    split_ids = split_identities(num_ids, fractions, seed)

    folder = os.path.join(root, spec.folder)
    marker = os.path.join(folder, MARKER_FILE)
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(marker):
        raise FileExistsError(f"{folder} exists and was not written by datasets.synth (no {MARKER_FILE}); "
                              "refusing to write generated data into it. Choose another --root.")
    # Start from a clean folder so that a smaller dataset leaves no stale files.
    for name in (spec.annotation, "imgs"):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.join(folder, "imgs"), exist_ok=True)
    params = {"generator": "datasets.synth", "format": fmt, "num_ids": num_ids, "seed": seed,
              "images_per_id": list(images_per_id), "split_fractions": list(fractions),
              "num_cameras": num_cameras}
    with open(marker, "w") as f:
        json.dump(params, f, indent=1)

    entries = []
    for split, pids in zip(spec.splits, split_ids):
        for pid in pids:
            person = draw_identity(seed, pid)
            count_rng = np.random.default_rng([seed, 4, pid])
            num_images = int(count_rng.integers(images_per_id[0], images_per_id[1] + 1))
            for k in range(num_images):
                camera = int(count_rng.integers(1, num_cameras + 1))
                image, back_view = draw_image(person, seed, k, camera)
                rel = _image_name(fmt, split, pid, k, camera)
                path = os.path.join(folder, "imgs", rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(_encode(image, spec.image_ext))
                caption_rng = np.random.default_rng([seed, 5, pid, k])
                captions = [write_caption(person, caption_rng, back_view) for _ in range(spec.captions_per_image)]
                entry = {"split": split, "captions": captions, spec.path_field: rel}
                if spec.processed_tokens:
                    entry["processed_tokens"] = [processed_tokens(c) for c in captions]
                entry["id"] = pid
                entries.append(entry)
    # Real annotation files interleave identities; so do these.
    order = np.random.default_rng([seed, 6]).permutation(len(entries)).tolist()
    entries = [entries[i] for i in order]
    annotation = os.path.join(folder, spec.annotation)
    tmp = annotation + ".tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f)
    os.replace(tmp, annotation)
    logger.info("wrote %d images of %d identities to %s", len(entries), num_ids, folder)
    return folder


def ensure_synthetic(root: str | os.PathLike, name: str, num_ids: int, seed: int = 0) -> str:
    """Generate the synthetic ``name`` dataset under ``root`` unless its annotation file exists.

    For the demo configuration: an existing dataset (real or generated) is
    never touched; a folder left by an interrupted generation (marker but no
    annotation file) is regenerated. Returns the dataset folder.
    """
    if name not in FORMAT_OF_DATASET:
        raise KeyError(f"No synthetic generator for dataset {name!r}; known: {sorted(FORMAT_OF_DATASET)}.")
    fmt = FORMAT_OF_DATASET[name]
    spec = FORMATS[fmt]
    root = os.fspath(root)
    folder = os.path.join(root, spec.folder)
    candidates = [spec.annotation] + (["ICFG-PEDES.json"] if fmt == "icfg" else [])
    if any(os.path.isfile(os.path.join(folder, c)) for c in candidates):
        marker = os.path.join(folder, MARKER_FILE)
        if os.path.isfile(marker):
            with open(marker) as f:
                params = json.load(f)
            if params.get("num_ids") != num_ids or params.get("seed") != seed:
                logger.warning("%s holds generated data with num_ids=%s seed=%s (asked: num_ids=%s seed=%s); "
                               "using it as it is. Delete the folder to regenerate.",
                               folder, params.get("num_ids"), params.get("seed"), num_ids, seed)
        return folder
    logger.info("generating a synthetic %s dataset (%d identities, seed %d) in %s", name, num_ids, seed, folder)
    return generate(root, fmt, num_ids, seed)


def contact_sheet(folder: str, path: str, columns: int = 12, rows: int = 4, cell: tuple[int, int] = (64, 160)) -> None:
    """Save a grid of the first images of a generated dataset (for looking at them)."""
    files = []
    for dirpath, _, names in sorted(os.walk(os.path.join(folder, "imgs"))):
        files.extend(os.path.join(dirpath, n) for n in sorted(names))
    sheet = Image.new("RGB", (columns * cell[0], rows * cell[1]), (255, 255, 255))
    for i, file in enumerate(files[:columns * rows]):
        with Image.open(file) as im:
            im = im.convert("RGB")
            im.thumbnail(cell)
            sheet.paste(im, ((i % columns) * cell[0], (i // columns) * cell[1]))
    sheet.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder that will hold the dataset folder")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="on-disk format to write")
    parser.add_argument("--num_ids", type=int, required=True, help="number of identities")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images_per_id", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="images per identity (inclusive range; default depends on the format)")
    parser.add_argument("--contact_sheet", default=None, help="also save a grid of sample images to this PNG")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        folder = generate(args.root, args.format, args.num_ids, args.seed, images_per_id=args.images_per_id)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spec = FORMATS[args.format]
    with open(os.path.join(folder, spec.annotation)) as f:
        num_images = len(json.load(f))
    print(f"wrote {num_images} images of {args.num_ids} identities to {folder} "
          f"in {time.perf_counter() - start:.1f} s")
    if args.contact_sheet:
        contact_sheet(folder, args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
