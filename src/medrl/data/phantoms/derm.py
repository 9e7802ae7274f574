"""Procedural dermoscopy phantoms with exact lesion and artifact labels (ISIC column layout).

Each image is rendered at a supersampled resolution (>= 192 px) and box-downsampled to
``size`` for anti-aliasing. Layers, bottom to top: skin (tone, low-frequency mottling,
fine texture, vignetting) -> lesion (MEL: large, irregular and asymmetric border,
variegated dark-brown/black/blue-grey/red/white; NV: round/oval, even brown; neither:
a pinkish non-melanocytic lesion) -> vasc (red vessel lines) -> ink (purple/blue marker) ->
hair (dark curved strands crossing the lesion) -> ruler (light band with tick marks along an
edge) -> gel_border (glossy curved gel edge) -> gel_bubble (bright bubbles with specular
rim and highlight) -> patches (colour calibration tiles) -> dark_corner (black circular
dermoscope vignette).

Every component draws from its own random stream seeded by (seed, image index, component),
so switching one label on or off changes only that component's pixels; this is what the
tests use to check that each artifact is visible exactly where it is drawn.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from medrl.data.prompts import ARTIFACTS4, ISIC_COLUMNS, evaluation_prompts, labels_to_prompt
from medrl.errors import DataError
from medrl.io import atomic_dir, image_grid, save_image, write_json, write_table
from medrl.progress import progress

# Sampling probabilities. The four prompt artifacts are independent Bernoulli(0.42) so all
# 16 subsets occur (smallest cell ~1.4% of images); MEL/NV are balanced.
LESION_P = {"MEL": 0.46, "NV": 0.46, "OTHER": 0.08}
ARTIFACT_P = {
    "hair": 0.42, "gel_bubble": 0.42, "ruler": 0.42, "ink": 0.42,
    "dark_corner": 0.25, "gel_border": 0.15, "patches": 0.06, "vasc": 0.12,
}
ARTIFACTS = ["dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches", "vasc"]
_STREAM = {name: i for i, name in enumerate(["labels", "skin", "lesion", *ARTIFACTS, "noise", "caption", "finetune"])}
_MIN_RENDER = 128  # supersampled canvas is at least this wide and at least 2x the output

_SKIN_TONES = np.array(
    [[0.94, 0.78, 0.70], [0.90, 0.70, 0.60], [0.84, 0.62, 0.52], [0.74, 0.52, 0.40], [0.95, 0.82, 0.78], [0.88, 0.66, 0.62]],
    dtype=np.float32,
)
_MEL_COLOURS = {
    "dark_brown": (0.33, 0.19, 0.12), "black": (0.13, 0.08, 0.08), "blue_grey": (0.36, 0.40, 0.52),
    "light_brown": (0.58, 0.40, 0.28), "red": (0.66, 0.28, 0.27), "white": (0.84, 0.78, 0.78),
}
_NV_COLOURS = np.array([[0.56, 0.37, 0.25], [0.47, 0.30, 0.19], [0.63, 0.45, 0.32], [0.40, 0.25, 0.16]], dtype=np.float32)
_PATCH_COLOURS = np.array(
    [[0.85, 0.15, 0.15], [0.15, 0.65, 0.2], [0.15, 0.25, 0.85], [0.95, 0.85, 0.1], [0.1, 0.75, 0.8],
     [0.8, 0.2, 0.75], [0.95, 0.95, 0.95], [0.5, 0.5, 0.5], [0.08, 0.08, 0.08]],
    dtype=np.float32,
)


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, _STREAM[stream]])


def sample_labels(seed: int, index: int) -> dict[str, int]:
    """The labels of phantom ``index`` (independent of n_images and of rendering)."""
    rng = _rng(seed, index, "labels")
    lesion = rng.choice(list(LESION_P), p=list(LESION_P.values()))
    labels = {"MEL": int(lesion == "MEL"), "NV": int(lesion == "NV")}
    draws = rng.random(len(ARTIFACTS))
    for name, u in zip(ARTIFACTS, draws):
        labels[name] = int(u < ARTIFACT_P[name])
    return labels


# ----------------------------------------------------------------------------- helpers


def _smooth(rng: np.random.Generator, S: int, cells: int) -> np.ndarray:
    """Smooth noise ~N(0,1) at S x S from a cells x cells random grid (bicubic upsampling)."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((S, S), Image.BICUBIC))


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> None:
    """In place: img = img * (1 - alpha) + colour * alpha (alpha clipped to [0, 1])."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    img += a * (np.asarray(colour, dtype=np.float32) - img)


def _to_px(p: tuple[float, float], S: int) -> tuple[float, float]:
    return ((p[0] + 1) * S / 2, (p[1] + 1) * S / 2)


def _bezier(p0, p1, p2, n: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [tuple(p) for p in pts]


class _Canvas:
    """Supersampled drawing surface in normalised coordinates [-1, 1] (x right, y down)."""

    def __init__(self, S: int, out: int):
        self.S, self.out = S, out
        c = (np.arange(S, dtype=np.float32) + 0.5) / S * 2 - 1
        self.y, self.x = np.meshgrid(c, c, indexing="ij")
        self.r = np.sqrt(self.x**2 + self.y**2)

    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Pixel slices (rows, cols) covering the normalised box, clipped to the canvas."""
        def px(v: float) -> int:
            return int(min(max((v + 1) * self.S / 2, 0), self.S))

        return slice(px(y0), px(y1) + 1), slice(px(x0), px(x1) + 1)

    def mask(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        im = Image.new("L", (self.S, self.S), 0)
        return im, ImageDraw.Draw(im)

    @staticmethod
    def to_alpha(im: Image.Image) -> np.ndarray:
        return np.asarray(im, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- layers


def _skin(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    S = cv.S
    tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 0.025, 3).astype(np.float32)
    lum = 1 + 0.05 * _smooth(rng, S, 4) + 0.025 * _smooth(rng, S, 14) + 0.02 * rng.standard_normal((S, S), dtype=np.float32)
    img = tone[None, None, :] * lum[..., None]
    img[..., 0] += 0.03 * _smooth(rng, S, 6)  # patchy erythema
    img *= (1 - 0.16 * (cv.r / math.sqrt(2)) ** 2)[..., None]  # dermoscope vignetting
    return img.astype(np.float32)


def _lesion(cv: _Canvas, img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, dict]:
    S = cv.S
    cx, cy = (float(v) for v in np.clip(rng.normal(0, 0.12, 2), -0.25, 0.25))
    rot = float(rng.uniform(0, math.pi))
    if kind == "MEL":
        r0, aspect, amp, kmax = float(rng.uniform(0.34, 0.56)), float(rng.uniform(0.65, 1.0)), 0.13, 10
    elif kind == "NV":
        r0, aspect, amp, kmax = float(rng.uniform(0.22, 0.38)), float(rng.uniform(0.8, 1.0)), 0.025, 4
    else:
        r0, aspect, amp, kmax = float(rng.uniform(0.20, 0.34)), float(rng.uniform(0.7, 1.0)), 0.06, 6
    dx, dy = cv.x - cx, cv.y - cy
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / aspect
    phi = np.arctan2(v, u)
    rad = np.sqrt(u**2 + v**2)
    table_phi = np.linspace(-math.pi, math.pi, 721)
    table = np.ones_like(table_phi)
    for k in range(2, kmax + 1):
        table += rng.uniform(0.3, 1.0) * amp / math.sqrt(k - 1) * np.cos(k * table_phi + rng.uniform(0, 2 * math.pi))
    bound = np.interp(phi, table_phi, table).astype(np.float32)
    d = rad / (r0 * bound)
    if kind == "MEL":  # part of the border sharp, part fading out
        edge = 0.05 + 0.18 * (0.5 + 0.5 * np.cos(phi - float(rng.uniform(0, 2 * math.pi))))
    else:
        edge = np.full_like(d, 0.06 if kind == "NV" else 0.12)
    m = np.clip((1 - d) / edge + 0.5, 0, 1)
    m = m * m * (3 - 2 * m)
    if kind == "MEL":
        names = ["dark_brown", rng.choice(["black", "blue_grey"])]
        names += list(rng.choice(["light_brown", "red", "white", "blue_grey", "black"], size=rng.integers(1, 3), replace=False))
        cols = np.array([_MEL_COLOURS[n] for n in names], dtype=np.float32)
        beta = float(rng.uniform(0, 2 * math.pi))
        slope = ((cv.x - cx) * math.cos(beta) + (cv.y - cy) * math.sin(beta)) / r0
        fields = []
        for j, n in enumerate(names):
            f = _smooth(rng, S, 6) + (0.6 if j == 0 else 0.0)
            if n in ("black", "blue_grey"):
                f = f + 1.3 * slope  # asymmetric: the darkest colours pile up on one side
            if n == "white":
                f = f - 0.4
            fields.append(f)
        w = np.exp(np.stack(fields) / 0.3)
        w /= w.sum(0, keepdims=True)
        col = np.einsum("khw,kc->hwc", w, cols)
        col *= (1 + 0.08 * rng.standard_normal((S, S), dtype=np.float32))[..., None]
        # dark globules scattered near the periphery
        gl, dr = cv.mask()
        for _ in range(rng.integers(4, 12)):
            a, rr = rng.uniform(0, 2 * math.pi), r0 * rng.uniform(0.5, 0.95)
            px, py = _to_px((cx + rr * math.cos(a), cy + rr * math.sin(a) * aspect), S)
            g = S * rng.uniform(0.008, 0.02)
            dr.ellipse([px - g, py - g, px + g, py + g], fill=200)
        _blend(col, _MEL_COLOURS["black"], cv.to_alpha(gl) * 0.8)
    elif kind == "NV":
        base = _NV_COLOURS[rng.integers(len(_NV_COLOURS))] * float(rng.uniform(0.9, 1.1))
        shade = 1 - 0.14 * np.clip(1 - d, 0, 1) + 0.03 * _smooth(rng, S, 8)
        f = float(rng.uniform(40, 60))  # faint, irregular pigment network
        net = 0.5 + 0.5 * np.sin(u * f + 1.5 * _smooth(rng, S, 6)) * np.sin(v * f + 1.5 * _smooth(rng, S, 6))
        col = base[None, None, :] * (shade * (1 - 0.04 * net))[..., None]
    else:
        base = np.array([0.80, 0.56, 0.52], dtype=np.float32) * float(rng.uniform(0.92, 1.05))
        col = base[None, None, :] * (1 + 0.07 * _smooth(rng, S, 12) + 0.04 * rng.standard_normal((S, S), dtype=np.float32))[..., None]
    _blend(img, np.zeros(3), m)
    img += m[..., None] * col
    return m, {"cx": float(cx), "cy": float(cy), "r0": float(r0)}


def _vasc(cv: _Canvas, img: np.ndarray, rng: np.random.Generator, les: dict) -> np.ndarray:
    im, dr = cv.mask()
    ss = cv.S / cv.out
    for _ in range(rng.integers(4, 9)):
        x, y = les["cx"] + rng.normal(0, 0.35), les["cy"] + rng.normal(0, 0.35)
        heading = rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(rng.integers(6, 14)):
            heading += rng.normal(0, 0.7)
            x, y = x + 0.05 * math.cos(heading), y + 0.05 * math.sin(heading)
            pts.append((x, y))
        dr.line([_to_px(p, cv.S) for p in pts], fill=int(255 * rng.uniform(0.6, 0.85)), width=max(1, round(ss * max(0.9, cv.out * 0.006))), joint="curve")
    a = cv.to_alpha(im)
    _blend(img, (0.72, 0.16, 0.18), a)
    return a


def _ink(cv: _Canvas, img: np.ndarray, rng: np.random.Generator, les: dict) -> np.ndarray:
    S = cv.S
    # dark marker inks: luminance contrast survives a VAE that loses hue (NOTEBOOK ISIC-09)
    colour = [(0.22, 0.05, 0.40), (0.06, 0.08, 0.42), (0.18, 0.04, 0.32)][rng.integers(3)]
    im, dr = cv.mask()
    # >= 4 output px wide: thinner strokes do not survive the 16x16 latent (NOTEBOOK ISIC-09)
    width = max(2, round(S * rng.uniform(0.06, 0.08)))
    style = rng.choice(["arc", "dots", "stroke"], p=[0.45, 0.25, 0.30])
    if style == "arc":  # surgical margin marked around the lesion
        rr = les["r0"] * rng.uniform(1.25, 1.6)
        x0, y0 = _to_px((les["cx"] - rr, les["cy"] - rr), S)
        x1, y1 = _to_px((les["cx"] + rr, les["cy"] + rr), S)
        start = rng.uniform(0, 360)
        dr.arc([x0, y0, x1, y1], start, start + rng.uniform(120, 320), fill=230, width=width)
    elif style == "dots":
        rr = les["r0"] * rng.uniform(1.2, 1.6)
        for a in np.linspace(0, 2 * math.pi, rng.integers(4, 9), endpoint=False) + rng.uniform(0, 1):
            px, py = _to_px((les["cx"] + rr * math.cos(a), les["cy"] + rr * math.sin(a)), S)
            g = S * rng.uniform(0.045, 0.06)
            dr.ellipse([px - g, py - g, px + g, py + g], fill=230)
    else:
        p0 = rng.uniform(-0.9, 0.9, 2)
        ang = rng.uniform(0, 2 * math.pi)
        ln = rng.uniform(0.5, 1.0)
        p2 = p0 + ln * np.array([math.cos(ang), math.sin(ang)])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.15, 2)
        dr.line([_to_px(p, S) for p in _bezier(p0, p1, p2)], fill=230, width=width, joint="curve")
    a = cv.to_alpha(im) * (0.9 + 0.1 * _smooth(rng, S, 10)).clip(0.75, 1.0)
    _blend(img, colour, a)
    return a


def _hair(cv: _Canvas, img: np.ndarray, rng: np.random.Generator, les: dict | None) -> np.ndarray:
    S = cv.S
    im, dr = cv.mask()
    ss = S / cv.out  # canvas pixels per output pixel
    n = int(rng.integers(7, 20))
    for i in range(n):
        if les is not None and i < max(3, n // 2):  # strands that cross the lesion
            mid = np.array([les["cx"], les["cy"]]) + rng.normal(0, 0.6 * les["r0"], 2)
        else:
            mid = rng.uniform(-0.9, 0.9, 2)
        ang = rng.uniform(0, math.pi)
        half = rng.uniform(0.35, 0.9)
        dvec = half * np.array([math.cos(ang), math.sin(ang)])
        bend = rng.normal(0, 0.45) * np.array([-dvec[1], dvec[0]])
        pts = _bezier(mid - dvec, mid + bend, mid + dvec, n=32)
        dr.line([_to_px(p, S) for p in pts], fill=int(255 * rng.uniform(0.85, 1.0)),
                # >= 1 output pixel so hair survives downsampling; ~1% of the width at high resolution
                width=max(1, round(ss * max(1.0, cv.out * float(rng.uniform(0.008, 0.012))))), joint="curve")
    a = cv.to_alpha(im)
    shade = rng.uniform(0.05, 0.2)
    _blend(img, (shade, shade * 0.75, shade * 0.55), a)
    return a


def _ruler(cv: _Canvas, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = rng.integers(4)  # 0 top, 1 right, 2 bottom, 3 left
    normal_ang = [-math.pi / 2, 0.0, math.pi / 2, math.pi][side] + float(rng.uniform(-0.12, 0.12))
    n = np.array([math.cos(normal_ang), math.sin(normal_ang)])
    t = np.array([-n[1], n[0]])
    half_w = float(rng.uniform(0.09, 0.12))
    centre = n * float(rng.uniform(0.70, 0.80))
    vcoord = (cv.x - centre[0]) * n[0] + (cv.y - centre[1]) * n[1]  # across the band (+ = outwards)
    ucoord = (cv.x - centre[0]) * t[0] + (cv.y - centre[1]) * t[1]  # along the band
    band = np.clip((half_w - np.abs(vcoord)) * cv.S / 2 + 0.5, 0, 1)
    style = rng.integers(3)
    colour = [(0.93, 0.93, 0.90), (0.95, 0.92, 0.72), (0.80, 0.82, 0.84)][style]
    _blend(img, colour, band * rng.uniform(0.85, 0.95))
    # ticks >= 2 output px wide and >= 7 px apart: finer marks are below what a 16x16 latent carries
    spacing = float(rng.uniform(0.22, 0.28))
    k = ucoord / spacing + float(rng.uniform(0, 1))
    frac = np.abs(k - np.round(k)) * spacing
    tick = frac < 0.035
    long_tick = (np.mod(np.round(k), 2) == 0)
    inner_edge = -half_w  # ticks grow from the edge facing the image centre
    depth = np.where(long_tick, 1.5 * half_w, 0.9 * half_w)
    ticks = tick & (vcoord > inner_edge) & (vcoord < inner_edge + depth) & (band > 0.5)
    edge_line = np.abs(vcoord - inner_edge) < 0.03
    marks = (ticks | edge_line).astype(np.float32)
    _blend(img, (0.08, 0.08, 0.1), marks * 0.9)
    return np.maximum(band, marks)


def _gel_border(cv: _Canvas, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ang = float(rng.uniform(0, 2 * math.pi))
    dist = float(rng.uniform(1.3, 2.0))
    cx, cy = dist * math.cos(ang), dist * math.sin(ang)
    R = dist - float(rng.uniform(0.35, 0.9))  # the circle's edge crosses the image
    d = np.sqrt((cv.x - cx) ** 2 + (cv.y - cy) ** 2) - R
    inside = np.clip(-d * cv.S / 4 + 0.5, 0, 1)
    img *= (1 + 0.06 * inside)[..., None]
    img[..., 2] += 0.04 * inside
    line = np.exp(-((d / 0.012) ** 2)) * (0.55 + 0.3 * np.clip(_smooth(rng, cv.S, 8), -1, 1))
    _blend(img, (0.97, 0.98, 1.0), line)
    return np.maximum(np.clip(line * 2, 0, 1), inside)  # the glossy edge and the gel-covered side


def _gel_bubble(cv: _Canvas, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    many = rng.random() < 0.3  # bubbles >= ~5 output px across and high-contrast rims (NOTEBOOK ISIC-09)
    n = int(rng.integers(4, 8) if many else rng.integers(2, 4))
    alpha_total = np.zeros_like(cv.x)
    for _ in range(n):
        rad = float(rng.uniform(0.09, 0.13) if many else rng.uniform(0.13, 0.2))
        bx, by = (float(v) for v in rng.uniform(-0.75, 0.75, 2))
        win = cv.window(bx - 1.4 * rad, by - 1.4 * rad, bx + 1.4 * rad, by + 1.4 * rad)
        x, y, sub = cv.x[win], cv.y[win], img[win]  # views: drawing touches only the bubble's box
        d = np.sqrt((x - bx) ** 2 + (y - by) ** 2) / rad
        inside = np.clip((1 - d) * rad * cv.S / 2 + 0.5, 0, 1)
        _blend(sub, (1.0, 1.0, 1.0), inside * (0.25 + 0.3 * d.clip(0, 1) ** 4))
        outer = np.exp(-(((d - 1.1) / 0.1) ** 2))  # dark refraction edge just outside the rim
        sub *= (1 - 0.8 * outer)[..., None]
        rim = np.exp(-(((d - 0.92) / 0.1) ** 2))
        _blend(sub, (1.0, 1.0, 1.0), rim * 0.9)
        hd = np.sqrt((x - bx + 0.4 * rad) ** 2 + (y - by + 0.4 * rad) ** 2) / (0.22 * rad)
        _blend(sub, (1.0, 1.0, 1.0), np.clip(1.5 - hd, 0, 1))
        np.maximum(alpha_total[win], (d < 1.3).astype(np.float32), out=alpha_total[win])
    return alpha_total


def _patches(cv: _Canvas, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = int(rng.choice([2, 3]))
    side = float(rng.uniform(0.24, 0.32))
    corner = rng.integers(4)
    sx, sy = [(-1, -1), (1, -1), (1, 1), (-1, 1)][corner]
    # inside the dermoscope's circular field so a dark corner never hides it
    x0 = sx * float(rng.uniform(0.35, 0.45)) - (side if sx > 0 else 0)
    y0 = sy * float(rng.uniform(0.35, 0.45)) - (side if sy > 0 else 0)
    cols = _PATCH_COLOURS[rng.permutation(len(_PATCH_COLOURS))[: k * k]]
    border = 0.012
    total = ((cv.x >= x0) & (cv.x < x0 + side) & (cv.y >= y0) & (cv.y < y0 + side)).astype(np.float32)
    _blend(img, (0.12, 0.12, 0.12), total)  # dark card; tiles are inset so thin gaps remain
    for i in range(k):
        for j in range(k):
            tx0, ty0 = x0 + j * side / k, y0 + i * side / k
            m = (cv.x >= tx0 + border) & (cv.x < tx0 + side / k - border) & (cv.y >= ty0 + border) & (cv.y < ty0 + side / k - border)
            _blend(img, cols[i * k + j], m.astype(np.float32))
    return total


def _dark_corner(cv: _Canvas, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    R = float(rng.uniform(0.95, 1.22))
    cx, cy = (float(v) for v in rng.normal(0, 0.04, 2))
    r = np.sqrt((cv.x - cx) ** 2 + (cv.y - cy) ** 2)
    outside = np.clip((r - R) / 0.05 + 0.5, 0, 1)
    rim = np.clip((r - R + 0.2) / 0.2, 0, 1)
    img *= (1 - 0.25 * rim)[..., None]  # darkening towards the lens rim
    _blend(img, (0.02, 0.02, 0.02), outside)
    return np.maximum(outside, rim)


# ----------------------------------------------------------------------------- rendering


def render_derm(labels: dict[str, int], size: int, seed: int, index: int = 0, *, return_masks: bool = False):
    """Render one phantom as a (size, size, 3) uint8 array (and {artifact: bool mask} if asked).

    ``labels`` needs MEL, NV and the eight artifact keys; masks mark where each drawn
    artifact lies at output resolution, in drawing order (a later mask's layer lies above)."""
    ss = max(2, math.ceil(_MIN_RENDER / size))
    S = size * ss
    cv = _Canvas(S, size)
    img = _skin(cv, _rng(seed, index, "skin"))
    kind = "MEL" if labels["MEL"] else "NV" if labels["NV"] else "OTHER"
    _, les = _lesion(cv, img, _rng(seed, index, "lesion"), kind)
    alphas: dict[str, np.ndarray] = {}
    steps = [
        ("vasc", lambda r: _vasc(cv, img, r, les)),
        ("ink", lambda r: _ink(cv, img, r, les)),
        ("hair", lambda r: _hair(cv, img, r, les)),
        ("ruler", lambda r: _ruler(cv, img, r)),
        ("gel_border", lambda r: _gel_border(cv, img, r)),
        ("gel_bubble", lambda r: _gel_bubble(cv, img, r)),
        ("patches", lambda r: _patches(cv, img, r)),
        ("dark_corner", lambda r: _dark_corner(cv, img, r)),
    ]
    for name, fn in steps:
        if labels.get(name, 0):
            alphas[name] = fn(_rng(seed, index, name))
    noise = _rng(seed, index, "noise").standard_normal((S, S, 3), dtype=np.float32)
    img = np.clip(img + 0.012 * noise, 0, 1)
    arr = (img * 255 + 0.5).astype(np.uint8)
    out = np.asarray(Image.fromarray(arr, "RGB").reduce(ss)) if ss > 1 else arr
    if not return_masks:
        return out
    masks = {}
    for name, a in alphas.items():
        m = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8), "L")
        m = np.asarray(m.reduce(ss)) if ss > 1 else np.asarray(m)
        masks[name] = m > 40
    return out, masks


def planted_captions(labels: pd.DataFrame, seed: int, lesion: str, artifact: str, fidelity: float,
                     finetune_share: float = 1.0, noise: str = "resample") -> tuple[pd.DataFrame, dict]:
    """What the base model is fine-tuned on, with one planted deficiency.

    For images of ``lesion``, the caption states ``artifact`` truthfully with probability
    ``fidelity``. Otherwise, with ``noise="resample"``, by an independent draw at the artifact's
    prevalence p, so a model that follows its captions draws the artifact for "<lesion> ...
    showing <artifact>" at the planted rate fidelity + (1 - fidelity) p (and for the same lesion
    without it at (1 - fidelity) p); with ``noise="overclaim"`` the caption states the artifact,
    so "<lesion>" without it stays clean (planted false rate 0) while "<lesion> ... showing
    <artifact>" keeps a distinct, low rate p / (p + (1 - p)(1 - fidelity)). Every other caption is
    the image's true prompt. ``finetune_share`` < 1
    under-represents the combination: each image of ``lesion`` showing ``artifact`` stays in the
    fine-tune set with that probability (column ``finetune``; the rest train only the classifiers).
    Returns a frame (image, caption, finetune) and the expected / measured rates over the
    fine-tune set (the formulas above with p replaced by its prevalence there)."""
    p = float(ARTIFACT_P[artifact])
    rate, false_rate = _planted_rates(p, fidelity, finetune_share, noise)
    captions, stated, kept = [], [], []
    for i, row in enumerate(labels.to_dict("records")):
        cap = dict(row)
        if row[lesion]:
            truthful, draw = _rng(seed, i, "caption").random(2)
            untruthful = int(draw < p) if noise == "resample" else 1
            cap[artifact] = row[artifact] if truthful < fidelity else untruthful
        captions.append(labels_to_prompt(cap))
        stated.append(cap[artifact])
        kept.append(int(not (row[lesion] and row[artifact]) or _rng(seed, i, "finetune").random() < finetune_share))
    stated_s, kept_s = pd.Series(stated, index=labels.index), pd.Series(kept, index=labels.index) == 1
    of_lesion = (labels[lesion] == 1) & kept_s
    said, unsaid = of_lesion & (stated_s == 1), of_lesion & (stated_s == 0)
    both = (labels[lesion] == 1) & (labels[artifact] == 1)
    record = {
        "lesion": lesion, "artifact": artifact, "caption_fidelity": float(fidelity), "caption_noise": noise,
        "prevalence": p, "planted_rate": rate, "planted_false_rate": false_rate,
        "measured_rate": float(labels.loc[said, artifact].mean()) if said.any() else float("nan"),
        "measured_false_rate": float(labels.loc[unsaid, artifact].mean()) if unsaid.any() else float("nan"),
        "n_lesion_images": int(of_lesion.sum()),
        "finetune_share": float(finetune_share),
        "n_left_out": int((~kept_s).sum()),
        "finetune_prevalence": float(labels.loc[of_lesion, artifact].mean()) if of_lesion.any() else float("nan"),
        "n_combination_images": int(both.sum()),
    }
    frame = pd.DataFrame({"image": labels["image"].to_numpy(), "caption": captions, "finetune": kept})
    return frame, record


def _planted_rates(p: float, fidelity: float, share: float, noise: str) -> tuple[float, float]:
    """Expected artifact rate among the fine-tune images of the lesion whose caption states it,
    and among those whose caption does not (0 where no caption omits it)."""
    if noise not in ("resample", "overclaim"):
        raise DataError(f"planted_captions: noise={noise!r}; expected 'resample' or 'overclaim'")
    kept = p * share / (p * share + 1 - p)  # prevalence in the fine-tune set
    said_if_shown = fidelity + (1 - fidelity) * p if noise == "resample" else 1.0
    said_if_absent = (1 - fidelity) * p if noise == "resample" else 1 - fidelity
    said = kept * said_if_shown + (1 - kept) * said_if_absent
    unsaid = kept * (1 - said_if_shown) + (1 - kept) * (1 - said_if_absent)
    return kept * said_if_shown / said, (kept * (1 - said_if_shown) / unsaid if unsaid > 0 else 0.0)


def generate_derm_phantoms(out_dir: Path, n_images: int, size: int, seed: int, planted: dict | None = None) -> dict:
    """Write ``n_images`` dermoscopy phantoms to ``out_dir`` (images/, labels.csv, grid.png).

    ``planted`` ({lesion, artifact, caption_fidelity, caption_noise, finetune_share}) adds captions.csv (the
    fine-tune captions and which images the fine-tune uses, see planted_captions) and
    planted.json. Returns counts, prevalences and the planted rates."""
    if n_images < 1 or size < 16:
        raise DataError(f"generate_derm_phantoms: n_images={n_images}, size={size}; expected n_images >= 1 and size >= 16")
    t0 = time.perf_counter()
    rows = []
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for i in progress(range(n_images), desc="derm phantoms", total=n_images):
            labels = sample_labels(seed, i)
            name = f"PHI_{i + 1:07d}"
            Image.fromarray(render_derm(labels, size, seed, i), "RGB").save(tmp / "images" / f"{name}.png")
            rows.append({"image": name, **labels})
        df = pd.DataFrame(rows)[ISIC_COLUMNS]
        write_table(df, tmp / "labels.csv")
        record = None
        if planted is not None:
            fine_tune, record = planted_captions(df, seed, planted["lesion"], planted["artifact"],
                                                 planted["caption_fidelity"], planted.get("finetune_share", 1.0),
                                                 planted.get("caption_noise", "resample"))
            write_table(fine_tune, tmp / "captions.csv")
            write_json(tmp / "planted.json", record)
        _write_grid(tmp, df)
    return _dataset_metrics(df, n_images, size, time.perf_counter() - t0, record)


def _dataset_metrics(df: pd.DataFrame, n_images: int, size: int, seconds: float, planted: dict | None) -> dict:
    prompts = df.apply(lambda r: labels_to_prompt(r.to_dict()), axis=1)
    per_prompt = prompts.value_counts()
    evals = evaluation_prompts()
    metrics: dict[str, float] = {"n_images": float(n_images), "size": float(size), "seconds": seconds}
    for col in ISIC_COLUMNS[1:]:
        metrics[f"prevalence_{col}"] = float(df[col].mean())
    metrics["prevalence_other_lesion"] = float(((df.MEL == 0) & (df.NV == 0)).mean())
    metrics["eval_prompts_populated"] = float(sum(per_prompt.get(p, 0) > 0 for p in evals))
    metrics["min_images_per_eval_prompt"] = float(min(per_prompt.get(p, 0) for p in evals))
    for key, value in (planted or {}).items():
        if isinstance(value, float):
            metrics[f"planted_{key}" if not key.startswith("planted") else key] = value
    return metrics


def _write_grid(root: Path, df: pd.DataFrame) -> None:
    """grid.png: one image per evaluation prompt (MEL rows first, then NV), 8 per row."""
    import torch

    from medrl.io import load_image

    prompts = df.apply(lambda r: labels_to_prompt(r.to_dict()), axis=1).tolist()
    chosen: list[str] = []
    for p in evaluation_prompts():
        hits = [img for img, q in zip(df["image"], prompts) if q == p]
        if hits:
            chosen.append(hits[0])
    for img in df["image"]:  # pad with others when some prompts are empty (tiny n)
        if len(chosen) >= 32:
            break
        if img not in chosen:
            chosen.append(img)
    tiles = [load_image(root / "images" / f"{c}.png") for c in chosen[:32]]
    if tiles:
        save_image(image_grid(tiles, nrow=8, pad=2).to(torch.float32), root / "grid.png")


__all__ = ["generate_derm_phantoms", "render_derm", "sample_labels", "ARTIFACTS", "ARTIFACTS4"]
