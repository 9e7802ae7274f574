"""Procedural chest-X-ray phantoms with known posture, pathologies and a written report.

Anatomy (canonical pose, PA unless noted) is drawn as an attenuation map on a supersampled
canvas in normalised coordinates (x right, y down, both in [-1, 1]; the patient's right is
on the image left): soft-tissue body outline with neck and shoulders, dark lung fields,
bright mediastinum with trachea and main bronchi, aortic knob, heart shadow shifted to the
patient's left, spine, posterior and anterior ribs, clavicles, humeral heads, diaphragm
domes with sharp costophrenic angles, gastric bubble, hila and branching vessel markings.

Pathology signatures (severity ``sev``; hedged findings are rendered faint):
Atelectasis = plate-like linear opacity plus volume loss (raised hemidiaphragm, shift);
Consolidation = dense homogeneous lobar region with air bronchograms; Pneumothorax =
lucent rim without lung markings outside a visceral pleural line; Edema = bilateral
perihilar haze, blurred vessels, Kerley B lines; Effusion = dependent fluid with a meniscus
that blunts the costophrenic angle; Pneumonia = patchy, ill-defined multifocal airspace
opacities; Cardiomegaly = wider heart; Lung Lesion = sharp round nodule/mass; Fracture =
rib or clavicle discontinuity with step-off and callus; Lung Opacity = faint ground-glass
patch; Enlarged Cardiomediastinum = wide superior mediastinum; Support Devices =
endotracheal / nasogastric tubes, central line, pacemaker with leads, sternal wires.
AP views: magnified heart, flatter and higher clavicles, scapulae over the lungs, lower
lung volumes, larger posture variation, more devices.

Posture convention (the same as ``torch.nn.functional.affine_grid``, align_corners=False,
and as ``medrl.models.posture``): psi = (sx, sy, tx, ty, theta) gives the matrix
``A(psi) = [R(theta) @ diag(sx, sy) | (tx, ty)]`` with ``R = [[cos, -sin], [sin, cos]]``, and

    observed = grid_sample(canonical, affine_grid(A(psi)))     (zeros outside)

i.e. the observed pixel at normalised position p shows the canonical content at A p + t.
This is the warp that maps canonical -> observed; sx > 1 zooms out. The canonical image is
recovered (up to resampling and the cropped border) by warping the observed image with
``invert_theta(A(psi))``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, map_coordinates

from medrl.data.reports import PATHOLOGIES
from medrl.errors import DataError
from medrl.io import atomic_dir, image_grid, save_image, write_table
from medrl.progress import progress

PSI_NAMES = ("sx", "sy", "tx", "ty", "theta")
DEVICES_COL = "Support Devices"
METADATA_COLUMNS = ["image", "subject_id", "study_id", "view", "split", "report", *PATHOLOGIES, DEVICES_COL, *PSI_NAMES]
SPLIT_FRACTIONS = {"train": 0.75, "validate": 0.05, "test": 0.20}
P_NO_FINDING = 0.30
P_HEDGE = 0.15
_MIN_RENDER = 128

# ----------------------------------------------------------------------------- affine algebra


def psi_to_theta(psi) -> torch.Tensor:
    """(..., 5) psi -> (..., 2, 3) affine_grid matrix [R(theta) diag(sx, sy) | t]."""
    psi = torch.as_tensor(psi, dtype=torch.get_default_dtype() if not torch.is_tensor(psi) else psi.dtype)
    sx, sy, tx, ty, th = psi.unbind(-1)
    c, s = torch.cos(th), torch.sin(th)
    row0 = torch.stack([c * sx, -s * sy, tx], -1)
    row1 = torch.stack([s * sx, c * sy, ty], -1)
    return torch.stack([row0, row1], -2)


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of a (..., 2, 3) affine (as a 2x3 matrix): the warp that undoes it."""
    last = torch.zeros(theta.shape[:-2] + (1, 3), dtype=theta.dtype)
    last[..., 0, 2] = 1
    full = torch.cat([theta, last], -2)
    return torch.linalg.inv(full)[..., :2, :]


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Exactly ``F.affine_grid(theta, (B, C, H, W), align_corners=False)``: (B, H, W, 2).

    Written out because ATen's grid generator is very slow under CPU thread contention."""
    xs = (torch.arange(width, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, dtype=theta.dtype) * 2 + 1) / height - 1
    base = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, dtype=theta.dtype)], -1)  # (H, W, 3)
    return torch.einsum("hwk,bjk->bhwj", base, theta)


def warp_image(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp (B, C, H, W) images by (B, 2, 3) matrices: grid_sample(image, affine_grid(theta)), zeros outside."""
    grid = affine_grid(theta.to(image.dtype), image.shape[-2], image.shape[-1])
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------- sampling

_STREAMS = ["case", "psi", "anatomy", "vessels", "pathology", "devices", "report", "noise"]


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, 100 + _STREAMS.index(stream)])


def _side(rng: np.random.Generator, p_bilateral: float = 0.0) -> str:
    u = rng.random()
    return "bilateral" if u < p_bilateral else ("right" if rng.random() < 0.5 else "left")


def sample_case(seed: int, index: int, view: str) -> dict:
    """Findings of phantom ``index``: {"findings": {class: attrs}, "devices": [...], "view"}.

    attrs has "value" (1 present / -1 hedged), "sev" in (0, 1] and location details.
    About P_NO_FINDING of cases have no finding; CHF-like (edema, cardiomegaly, bilateral
    effusions) and infection-like (pneumonia, consolidation, opacity) clusters give
    realistic co-occurrence; other classes are sprinkled independently."""
    rng = _rng(seed, index, "case")
    present: dict[str, dict] = {}
    if rng.random() >= P_NO_FINDING:
        if rng.random() < 0.25:  # congestive heart failure pattern
            if rng.random() < 0.8:
                present["Edema"] = {}
            if rng.random() < 0.6:
                present["Cardiomegaly"] = {}
            if rng.random() < 0.55:
                present["Effusion"] = {"side": "bilateral" if rng.random() < 0.7 else _side(rng)}
        if rng.random() < 0.22:  # infection pattern
            side = _side(rng, 0.15)
            if rng.random() < 0.7:
                present["Pneumonia"] = {"side": side}
            if rng.random() < 0.5:
                present["Consolidation"] = {"side": "left" if side == "left" else "right"}
            if rng.random() < 0.35:
                present["Lung Opacity"] = {"side": "right" if side == "bilateral" else side}
            if rng.random() < 0.2:
                present.setdefault("Effusion", {"side": side})
        independent = {
            "Atelectasis": 0.24, "Effusion": 0.12, "Cardiomegaly": 0.12, "Lung Opacity": 0.15, "Pneumothorax": 0.08,
            "Lung Lesion": 0.08, "Fracture": 0.06, "Enlarged Cardiomediastinum": 0.07, "Consolidation": 0.05,
            "Pneumonia": 0.04, "Edema": 0.03,
        }
        for cls, p in independent.items():
            if rng.random() < p:
                present.setdefault(cls, {})
        if not present:
            classes = list(independent)
            weights = np.array(list(independent.values()))
            present[classes[rng.choice(len(classes), p=weights / weights.sum())]] = {}
    for cls in PATHOLOGIES:  # fixed order keeps the random stream stable
        if cls not in present:
            continue
        attrs = present[cls]
        hedged = rng.random() < P_HEDGE
        attrs["value"] = -1 if hedged else 1
        attrs["sev"] = float(rng.uniform(0.35, 0.5) if hedged else rng.uniform(0.6, 1.0))
        if cls in ("Atelectasis", "Pneumothorax", "Lung Lesion", "Fracture", "Lung Opacity", "Consolidation", "Pneumonia"):
            attrs.setdefault("side", _side(rng))
        if cls == "Effusion":
            attrs.setdefault("side", _side(rng, 0.3))
        if cls == "Pneumonia" and attrs["side"] == "bilateral":
            attrs["multifocal"] = True
        if cls == "Consolidation":
            attrs["lobe"] = str(rng.choice(["lower", "upper"] if attrs["side"] == "left" else ["lower", "upper", "middle"]))
        if cls == "Lung Opacity":
            attrs["zone"] = str(rng.choice(["upper", "mid", "lower"]))
        if cls == "Lung Lesion":
            attrs["zone"] = str(rng.choice(["upper", "mid", "lower"]))
            attrs["cm"] = round(float(0.8 + 3.5 * attrs["sev"] ** 2 * rng.uniform(0.7, 1.1)), 1)
        if cls == "Fracture":
            attrs["bone"] = "clavicle" if rng.random() < 0.3 else "rib"
            attrs["rib"] = int(rng.integers(4, 9))
    p_dev = 0.5 if view == "AP" else 0.12
    devices: list[str] = []
    if rng.random() < p_dev:
        pool = ["ett", "ngt", "cvc", "pacemaker", "sternal_wires"]
        weights = np.array([0.3, 0.25, 0.3, 0.1, 0.05] if view == "AP" else [0.05, 0.1, 0.35, 0.3, 0.2])
        k = int(rng.integers(1, 3 if view == "AP" else 2))
        devices = sorted(rng.choice(pool, size=k, replace=False, p=weights / weights.sum()).tolist(), key=pool.index)
        if "ett" in devices and "ngt" not in devices and rng.random() < 0.6:
            devices.insert(1, "ngt")
    return {"view": view, "findings": present, "devices": devices}


def sample_psi(seed: int, index: int, view: str) -> tuple[float, float, float, float, float]:
    """Posture: PA within sx, sy 1 +- 0.1, t +- 0.08, theta ~N(0, 0.06); AP up to the full
    ranges 1 +- 0.15, +- 0.12, +- 0.2 rad."""
    rng = _rng(seed, index, "psi")
    if view == "AP":
        sx, sy = 1 + rng.uniform(-0.15, 0.15, 2)
        tx, ty = rng.uniform(-0.12, 0.12, 2)
        th = rng.uniform(-0.2, 0.2)
    else:
        sx, sy = 1 + rng.uniform(-0.10, 0.10, 2)
        tx, ty = rng.uniform(-0.08, 0.08, 2)
        th = float(np.clip(rng.normal(0, 0.06), -0.2, 0.2))
    return float(sx), float(sy), float(tx), float(ty), float(th)


# ----------------------------------------------------------------------------- drawing helpers


class _Canvas:
    def __init__(self, S: int):
        self.S = S
        c = (np.arange(S, dtype=np.float32) + 0.5) / S * 2 - 1
        self.y, self.x = np.meshgrid(c, c, indexing="ij")

    def px(self, p) -> tuple[float, float]:
        return (float(p[0]) + 1) * self.S / 2, (float(p[1]) + 1) * self.S / 2

    def width(self, w: float) -> int:
        return max(1, round(w * self.S / 2))

    def polygon(self, pts, blur: float = 0.0) -> np.ndarray:
        im = Image.new("L", (self.S, self.S), 0)
        ImageDraw.Draw(im).polygon([self.px(p) for p in pts], fill=255)
        return self._finish(im, blur)

    def lines(self, paths: list[tuple[list, float, float]], blur: float = 0.0) -> np.ndarray:
        """paths: (points, width in normalised units, value in [0, 1])."""
        im = Image.new("L", (self.S, self.S), 0)
        dr = ImageDraw.Draw(im)
        for pts, w, v in paths:
            dr.line([self.px(p) for p in pts], fill=int(255 * v), width=self.width(w), joint="curve")
        return self._finish(im, blur)

    def ellipse(self, cx, cy, a, b, rot=0.0, soft=0.01) -> np.ndarray:
        c, s = math.cos(rot), math.sin(rot)
        u = ((self.x - cx) * c + (self.y - cy) * s) / a
        v = (-(self.x - cx) * s + (self.y - cy) * c) / b
        d = np.sqrt(u * u + v * v)
        return np.clip((1 - d) * min(a, b) / soft + 0.5, 0, 1).astype(np.float32)

    def blur(self, a: np.ndarray, sigma: float) -> np.ndarray:
        return gaussian_filter(a, sigma * self.S / 2) if sigma > 0 else a

    def _finish(self, im: Image.Image, blur: float) -> np.ndarray:
        return self.blur(np.asarray(im, dtype=np.float32) / 255.0, blur)


def _curve(fx, fy, n: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)
    return list(zip(fx(t), fy(t)))


def _bezier(P, t: np.ndarray) -> list[tuple[float, float]]:
    """Points of the cubic Bezier with control points P (4 x 2) at parameters t."""
    P = np.asarray(P, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)[:, None]
    pts = (1 - t) ** 3 * P[0] + 3 * (1 - t) ** 2 * t * P[1] + 3 * (1 - t) * t**2 * P[2] + t**3 * P[3]
    return [(float(x), float(y)) for x, y in pts]


def _smooth(rng: np.random.Generator, S: int, cells: int) -> np.ndarray:
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((S, S), Image.BICUBIC))


def _lung_polygon(s: int, apex_y: float, cp_y: float, dome_y: float, width: float, medial: float, n: int = 28):
    """Outline of one lung (s=-1: patient right / image left; s=+1: patient left)."""
    pts = []
    apex_x = 0.33
    for t in np.linspace(0, 1, n):  # lateral wall, rounded apex
        pts.append((s * (apex_x + (width - apex_x) * math.sin(t * math.pi / 2) ** 0.5), apex_y + t * (cp_y - apex_y)))
    for u in np.linspace(1, 0, n)[1:]:  # hemidiaphragm dome, lateral -> medial
        x = medial + (width - medial) * u
        lat = max(0.0, (u - 0.45) / 0.55)
        med = max(0.0, (0.45 - u) / 0.45)
        pts.append((s * x, dome_y + (cp_y - dome_y) * lat**2.2 + 0.06 * med**2))
    for t in np.linspace(1, 0, n)[1:]:  # mediastinal border, cardiophrenic angle -> apex
        y = apex_y + 0.07 + t * (dome_y + 0.06 - apex_y - 0.07)
        pts.append((s * (medial + 0.02 + 0.12 * (1 - t) ** 3), y))
    return pts


def _heart_polygon(scale: float, dome: dict, shift: float, n: int = 20):
    """Cardiac silhouette: convex right atrial border, left ventricular border down to the apex
    on the left hemidiaphragm, flat base on the diaphragm. ``scale`` widens it (cardiomegaly)."""
    cx = 0.04 + shift
    sx = lambda x: cx + (x - cx) * scale  # noqa: E731
    top = -0.10
    pts = []
    for t in np.linspace(0, 1, n):  # right heart border (image left), top -> cardiophrenic angle
        y = top + t * (dome[-1] + 0.07 - top)
        pts.append((sx(-0.09 - 0.11 * math.sin(math.pi * min(1.0, 0.25 + 0.75 * t))), y))
    apex = (sx(0.44), dome[1] + 0.02)
    for t in np.linspace(0, 1, n)[1:]:  # base along the diaphragm
        pts.append((pts[-1][0] + (apex[0] - pts[n - 1][0]) / (n - 1), dome[-1] + 0.07 + t * (apex[1] - dome[-1] - 0.07)))
    for phi in np.linspace(math.pi / 2, 0, n)[1:]:  # left ventricular border: convex arc, apex -> pulmonary trunk
        pts.append((sx(0.10 + 0.34 * math.sin(phi) ** 0.8), apex[1] - (apex[1] - top) * (1 - math.sin(phi) ** 1.6) ** 0.9))
    return pts


# ----------------------------------------------------------------------------- rendering


class _Scene:
    """One phantom being drawn: the canvas, the case's findings and the anatomy shared by every
    drawing step (lung outlines, heart, mediastinum, the air the lungs hold)."""

    def __init__(self, case: dict, size: int) -> None:
        self.ss = max(2, math.ceil(_MIN_RENDER / size))
        self.S = size * self.ss
        self.cv = _Canvas(self.S)
        self.find = case["findings"]
        self.ap = case["view"] == "AP"
        self.sev = {k: v["sev"] for k, v in self.find.items()}
        self.side = {k: v.get("side") for k, v in self.find.items()}

    def on(self, cls: str, s: int) -> bool:
        sd = self.side.get(cls)
        return cls in self.find and (sd == "bilateral" or (sd == "right" and s < 0) or (sd == "left" and s > 0))


def _anatomy_parameters(sc: _Scene, ra: np.random.Generator) -> None:
    """Patient variation, view and volume loss: lung apex/width, diaphragm domes, mediastinal shift,
    costophrenic angles, heart and mediastinum size."""
    find, sev = sc.find, sc.sev
    sc.apex_y = -0.80 + ra.uniform(-0.04, 0.04)
    sc.width = 0.80 + ra.uniform(-0.04, 0.03)
    dome = {-1: 0.30 + ra.uniform(-0.04, 0.04), 1: 0.37 + ra.uniform(-0.04, 0.04)}
    if sc.ap:  # supine/portable: lower lung volumes
        dome = {k: v - 0.06 for k, v in dome.items()}
    shift = 0.0
    if "Atelectasis" in find:
        for s in (-1, 1):
            if sc.on("Atelectasis", s):
                dome[s] -= 0.10 * sev["Atelectasis"]
                shift += 0.035 * s * sev["Atelectasis"]
    sc.dome, sc.shift = dome, shift
    sc.cp = {s: dome[s] + 0.24 + ra.uniform(-0.02, 0.02) for s in (-1, 1)}
    heart_scale = 1.0 + ra.uniform(-0.05, 0.05)
    if "Cardiomegaly" in find:
        heart_scale *= 1.22 + 0.22 * sev["Cardiomegaly"]
    if sc.ap:
        heart_scale *= 1.12
    sc.heart_scale = heart_scale
    med_w = 0.105 + ra.uniform(-0.01, 0.01)
    if "Enlarged Cardiomediastinum" in find:
        med_w *= 1.45 + 0.55 * sev["Enlarged Cardiomediastinum"]
    sc.med_w = med_w


def _masks(sc: _Scene) -> np.ndarray:
    """Body, lungs, heart, mediastinum and the aerated lung (``sc.air``); returns the soft-tissue density."""
    cv, S, shift, dome = sc.cv, sc.S, sc.shift, sc.dome
    # neck, trapezius slope to the shoulders, slight taper towards the abdomen
    shoulder = np.clip((cv.y + 0.97) / 0.2, 0, 1)
    body_w = 0.24 + 0.74 * shoulder * (2 - shoulder) - 0.06 * np.clip((cv.y - 0.4) / 0.6, 0, 1)
    sc.body = body = np.clip((body_w - np.abs(cv.x)) * S / 4 + 0.5, 0, 1).astype(np.float32)
    sc.lung_pts = {s: _lung_polygon(s, sc.apex_y, sc.cp[s], dome[s], sc.width, 0.10 + 0.02 * s + shift * s) for s in (-1, 1)}
    sc.lungs = {s: cv.polygon([(x + shift, y) for x, y in sc.lung_pts[s]], blur=0.012) for s in (-1, 1)}
    sc.heart = heart = cv.polygon(_heart_polygon(sc.heart_scale, dome, shift), blur=0.014)
    hy = dome[1] - 0.19
    med_w = sc.med_w
    sc.med_x = med_x = 0.0 + shift
    mediast = np.clip((med_w - np.abs(cv.x - med_x - 0.02)) * S / 4 + 0.5, 0, 1) * (cv.y < hy + 0.1)
    sc.mediast = mediast = np.maximum(mediast, cv.ellipse(med_x + 0.115 * (med_w / 0.105) ** 0.7, -0.30, 0.075 * (med_w / 0.105) ** 0.5, 0.065, soft=0.012))
    air = (sc.lungs[-1] + sc.lungs[1]) * (1 - 0.88 * heart) * (1 - mediast)  # retrocardiac lung faintly visible
    sc.air = air = np.clip(air, 0, 1).astype(np.float32)

    D = body * (0.47 + 0.24 * np.clip(1 - cv.x**2, 0, 1))  # soft tissue, thicker centrally
    D += 0.08 * np.clip((cv.y - dome[1]) / 0.15, 0, 1) * body  # liver / abdomen under the domes
    D += 0.02 * heart * (1 - air)
    return D


# --- pathology that changes how much air the lungs hold: each step updates sc.air, sc.extra
# (density added on top) and sc.markings_keep (where lung markings stay visible) in place.


def _draw_pneumothorax(sc: _Scene) -> None:
    cv, S, shift, air, extra = sc.cv, sc.S, sc.shift, sc.air, sc.extra
    for s in (-1, 1):
        if not sc.on("Pneumothorax", s):
            continue
        f = 1 - (0.15 + 0.22 * sc.sev["Pneumothorax"])
        hil = np.array([s * 0.18 + shift, -0.05])
        shrunk = [tuple(hil + f * (np.array([x + shift, y]) - hil) + np.array([0, 0.06 * (1 - f)])) for x, y in sc.lung_pts[s]]
        collapsed = cv.polygon(shrunk, blur=0.006)
        rim = np.clip(sc.lungs[s] - collapsed, 0, 1) * (1 - sc.heart) * (1 - sc.mediast)
        sc.markings_keep *= 1 - rim
        extra -= 0.07 * rim  # hyperlucent: no lung tissue at all
        air -= 0.12 * collapsed * air  # collapsed lung is denser
        line_im = Image.new("L", (S, S), 0)
        ImageDraw.Draw(line_im).line([cv.px(p) for p in shrunk + shrunk[:1]], fill=255, width=max(1, sc.ss))
        pleura = np.asarray(line_im, dtype=np.float32) / 255 * sc.lungs[s] * (1 - sc.heart) * (1 - sc.mediast)
        extra += 0.10 * cv.blur(pleura, 0.004)


def _draw_effusion(sc: _Scene) -> None:
    cv, shift, air, extra = sc.cv, sc.shift, sc.air, sc.extra
    for s in (-1, 1):
        if not sc.on("Effusion", s):
            continue
        e = sc.sev["Effusion"]
        level = sc.cp[s] - (0.12 + 0.40 * e)
        lateral = np.clip((np.abs(cv.x - shift) - 0.15) / 0.65, 0, 1)
        top = level - 0.14 * e * lateral**2  # meniscus: climbs the lateral chest wall
        fluid = np.clip((cv.y - top) / 0.05, 0, 1) * (np.sign(cv.x - shift) == s)
        fluid *= np.clip(sc.lungs[s] * 3, 0, 1)
        air *= 1 - 0.92 * fluid
        extra += 0.04 * fluid * sc.lungs[s]


def _draw_consolidation(sc: _Scene, rp: np.random.Generator) -> None:
    cv, S, shift, dome = sc.cv, sc.S, sc.shift, sc.dome
    a = sc.find["Consolidation"]
    s = -1 if a["side"] == "right" else 1
    cy = {"lower": dome[s] - 0.14, "upper": -0.42, "middle": 0.02}[a["lobe"]]
    cx = s * (0.45 if a["lobe"] != "middle" else 0.30) + shift
    blob = cv.ellipse(cx, cy, 0.30, 0.20, rot=rp.uniform(-0.3, 0.3), soft=0.12)
    blob = np.clip(blob * 1.6 + 0.5 * _smooth(rp, S, 7) - 0.35, 0, 1)
    blob = cv.blur(blob, 0.01) * sc.lungs[s]
    if a["lobe"] in ("upper", "middle"):  # sharp lower margin along a fissure
        blob *= np.clip((cy + 0.13 - cv.y) / 0.01, 0, 1)
    bronch = cv.lines([(_curve(lambda t, k=k: cx - s * 0.18 + s * 0.3 * t, lambda t, k=k: cy - 0.05 + (k - 1) * 0.05 * t), 0.012, 1.0)
                       for k in range(3)], blur=0.003)
    density = 0.9 * sc.sev["Consolidation"] * blob
    sc.air *= 1 - density
    sc.extra -= 0.07 * bronch * blob * sc.sev["Consolidation"]  # air bronchograms


def _draw_pneumonia(sc: _Scene, rp: np.random.Generator) -> None:
    cv, S = sc.cv, sc.S
    a = sc.find["Pneumonia"]
    sides = (-1, 1) if a["side"] == "bilateral" else ((-1,) if a["side"] == "right" else (1,))
    for s in sides:
        for _ in range(int(rp.integers(2, 4))):
            cx = s * rp.uniform(0.35, 0.65) + sc.shift
            cy = rp.uniform(-0.2, sc.dome[s] - 0.08)
            patch = cv.ellipse(cx, cy, rp.uniform(0.10, 0.18), rp.uniform(0.08, 0.14), soft=0.08)
            patch = np.clip(patch + 0.45 * _smooth(rp, S, 10) - 0.25, 0, 1)
            sc.air *= 1 - 0.75 * sc.sev["Pneumonia"] * cv.blur(patch, 0.02) * sc.lungs[s]


def _draw_atelectasis(sc: _Scene, rp: np.random.Generator) -> None:
    shift = sc.shift
    for s in (-1, 1):
        if not sc.on("Atelectasis", s):
            continue
        paths = []
        for _ in range(int(rp.integers(1, 3))):
            y0 = sc.dome[s] - rp.uniform(0.08, 0.22)
            x0 = s * rp.uniform(0.25, 0.4) + shift
            ln = rp.uniform(0.22, 0.38)
            tilt = rp.uniform(-0.05, 0.08)
            paths.append((_curve(lambda t, x0=x0, ln=ln: x0 + s * ln * t, lambda t, y0=y0, tilt=tilt: y0 + tilt * t + 0.02 * np.sin(np.pi * t)),
                          rp.uniform(0.022, 0.032), 1.0))
        plate = sc.cv.lines(paths, blur=0.014) * sc.lungs[s]
        sc.air *= 1 - 0.9 * sc.sev["Atelectasis"] * np.clip(1.3 * plate, 0, 1)


def _draw_edema(sc: _Scene, rp: np.random.Generator) -> None:
    cv, shift, dome, air = sc.cv, sc.shift, sc.dome, sc.air
    e = sc.sev["Edema"]
    haze = np.zeros_like(air)
    for s in (-1, 1):
        haze += np.exp(-(((cv.x - s * 0.22 - shift) / 0.38) ** 2 + ((cv.y + 0.02) / 0.42) ** 2))
    haze = np.clip(0.75 * haze + 0.25, 0, 1)
    air *= 1 - 0.55 * e * haze * (1 + 0.15 * _smooth(rp, sc.S, 8))
    kerley = []
    for s in (-1, 1):
        for _ in range(int(rp.integers(4, 8))):
            y = rp.uniform(dome[s] - 0.35, dome[s] - 0.02)
            x0 = s * (sc.width - 0.02) + shift
            kerley.append(([(x0, y), (x0 - s * rp.uniform(0.07, 0.12), y + rp.uniform(-0.01, 0.01))], 0.012, 1.0))
    sc.extra += 0.08 * e * cv.lines(kerley, blur=0.003) * (sc.lungs[-1] + sc.lungs[1])


def _draw_lung_opacity(sc: _Scene, rp: np.random.Generator) -> None:
    cv = sc.cv
    a = sc.find["Lung Opacity"]
    s = -1 if a["side"] == "right" else 1
    cy = {"upper": -0.45, "mid": -0.1, "lower": sc.dome[s] - 0.15}[a["zone"]]
    patch = cv.ellipse(s * rp.uniform(0.4, 0.6) + sc.shift, cy, rp.uniform(0.14, 0.22), rp.uniform(0.1, 0.16), soft=0.1)
    patch = cv.blur(np.clip(patch + 0.3 * _smooth(rp, sc.S, 8) - 0.1, 0, 1), 0.03)
    sc.air *= 1 - 0.6 * sc.sev["Lung Opacity"] * patch * sc.lungs[s]


def _draw_lung_lesion(sc: _Scene, rp: np.random.Generator) -> None:
    a = sc.find["Lung Lesion"]
    s = -1 if a["side"] == "right" else 1
    r = 0.025 + 0.018 * a["cm"]
    cy = {"upper": -0.45, "mid": -0.12, "lower": sc.dome[s] - 0.2}[a["zone"]]
    cx = s * rp.uniform(0.42, 0.62) + sc.shift
    sc.extra += 0.26 * (0.6 + 0.4 * sc.sev["Lung Lesion"]) * sc.cv.ellipse(cx, cy, r, r * rp.uniform(0.85, 1.0), rot=rp.uniform(0, 3), soft=0.006)


def _draw_air_pathology(sc: _Scene, rp: np.random.Generator) -> None:
    """Every finding that changes the lungs' air, in a fixed order (it fixes the random stream)."""
    sc.markings_keep = np.ones_like(sc.air)
    sc.extra = np.zeros_like(sc.air)
    find = sc.find
    if "Pneumothorax" in find:
        _draw_pneumothorax(sc)
    if "Effusion" in find:
        _draw_effusion(sc)
    if "Consolidation" in find:
        _draw_consolidation(sc, rp)
    if "Pneumonia" in find:
        _draw_pneumonia(sc, rp)
    if "Atelectasis" in find:
        _draw_atelectasis(sc, rp)
    if "Edema" in find:
        _draw_edema(sc, rp)
    if "Lung Opacity" in find:
        _draw_lung_opacity(sc, rp)
    if "Lung Lesion" in find:
        _draw_lung_lesion(sc, rp)


def _lung_markings(sc: _Scene, rv: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vessels branching from the hila, the hila, and the lung field not hidden by the heart."""
    cv, shift = sc.cv, sc.shift
    paths = []
    for s in (-1, 1):
        hil = (s * 0.19 + shift, -0.06)

        def branch(x, y, ang, length, w, depth):
            pts = [(x, y)]
            for _ in range(5):
                ang += rv.normal(0, 0.12)
                x, y = x + s * math.cos(ang) * length / 5, y + math.sin(ang) * length / 5
                pts.append((x, y))
            paths.append((pts, w, 1.0))
            if depth < 3:
                for da in (-1, 1):
                    branch(x, y, ang + da * rv.uniform(0.25, 0.6), length * rv.uniform(0.55, 0.75), w * 0.7, depth + 1)

        for ang in np.linspace(-1.25, 1.35, 6) + rv.normal(0, 0.1, 6):
            branch(hil[0], hil[1], ang, rv.uniform(0.18, 0.26), 0.022, 1)
    vessel_blur = 0.004 + (0.012 * sc.sev["Edema"] if "Edema" in sc.find else 0.0)
    vessels = cv.lines(paths, blur=vessel_blur)
    hila = sum(np.exp(-(((cv.x - s * 0.19 - shift) / 0.07) ** 2 + ((cv.y + 0.06) / 0.1) ** 2)) for s in (-1, 1))
    lungfield = np.clip(sc.lungs[-1] + sc.lungs[1], 0, 1) * (1 - sc.heart) * (1 - sc.mediast)  # lung not hidden by the heart
    return vessels, hila, lungfield


def _ribs(sc: _Scene, fracture: dict | None, frac_side: int, callus: np.ndarray) -> np.ndarray:
    """Posterior and anterior ribs (a fractured rib drawn as two offset segments; its callus added
    to ``callus`` in place)."""
    cv, shift, width = sc.cv, sc.shift, sc.width
    bone_paths, bone_inner = [], []
    for s in (-1, 1):
        for k in range(10):  # posterior ribs: arch up and out from the spine, then down the lateral wall
            y0 = sc.apex_y - 0.02 + 0.12 * k + (0.02 if sc.ap else 0.0)
            w = min(0.84, 0.55 + 0.15 * k) * width / 0.8
            P = [(s * 0.06 + shift, y0), (s * 0.45 * w / 0.84, y0 - 0.16), (s * (w + 0.01), y0 - 0.02), (s * w, y0 + 0.30)]
            if fracture and fracture.get("bone") == "rib" and s == frac_side and k == fracture["rib"]:
                t0, gap, step = 0.55, 0.04, 0.04 * (0.5 + fracture["sev"])
                seg1 = _bezier(P, np.linspace(0, t0 - gap, 16))
                seg2 = [(x, y + step) for x, y in _bezier(P, np.linspace(t0 + gap, 1, 12))]
                for seg in (seg1, seg2):
                    bone_paths.append((seg, 0.05, 1.0))
                    bone_inner.append((seg, 0.028, 1.0))
                cx_, cy_ = _bezier(P, np.array([t0]))[0]
                callus += 0.17 * fracture["sev"] * cv.ellipse(cx_, cy_ + step / 2, 0.055, 0.045, soft=0.02)
            else:
                seg = _bezier(P, np.linspace(0, 1, 28))
                bone_paths.append((seg, 0.05, 1.0))
                bone_inner.append((seg, 0.028, 1.0))
            if k < 8:  # anterior rib: fainter, from the lateral end down towards the sternum
                Q = [(s * w, y0 + 0.30), (s * (w - 0.05), y0 + 0.40), (s * (w - 0.3), y0 + 0.45), (s * (w - 0.55), y0 + 0.58)]
                bone_paths.append((_bezier(Q, np.linspace(0, 1, 14)), 0.04, 0.45))
    return cv.lines(bone_paths, blur=0.004) - 0.55 * cv.lines(bone_inner, blur=0.004)


def _clavicles(sc: _Scene, fracture: dict | None, frac_side: int, callus: np.ndarray) -> np.ndarray:
    """Both clavicles (a fractured one with a step-off; its callus added to ``callus`` in place)."""
    cv = sc.cv
    clav_paths = []
    for s in (-1, 1):
        m_y, l_y = (-0.70, -0.77) if sc.ap else (-0.60, -0.84)
        fx = lambda t, s=s: s * (0.07 + 0.58 * t)  # noqa: E731
        fy = lambda t, m_y=m_y, l_y=l_y: m_y + (l_y - m_y) * t + 0.03 * np.sin(2 * np.pi * t)  # noqa: E731
        if fracture and fracture.get("bone") == "clavicle" and s == frac_side:
            t0, gap, step = 0.55, 0.03, 0.03 * (0.5 + fracture["sev"])
            clav_paths.append((_curve(lambda t: fx(t * (t0 - gap)), lambda t: fy(t * (t0 - gap)), 12), 0.055, 1.0))
            clav_paths.append((_curve(lambda t: fx(t0 + gap + t * (1 - t0 - gap)), lambda t: fy(t0 + gap + t * (1 - t0 - gap)) + step, 12), 0.055, 1.0))
            callus += 0.12 * fracture["sev"] * cv.ellipse(float(fx(t0)), float(fy(t0)) + step / 2, 0.05, 0.04, soft=0.02)
        else:
            clav_paths.append((_curve(fx, fy, 24), 0.055, 1.0))
    return cv.lines(clav_paths, blur=0.004) - 0.4 * cv.lines([(p, 0.025, 1.0) for p, _, _ in clav_paths], blur=0.004)


def _spine_and_shoulders(sc: _Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Spine, humeral heads, axillary folds and (AP view) the scapulae."""
    cv, S = sc.cv, sc.S
    spine_col = np.clip((0.065 - np.abs(cv.x - sc.shift * 0.3)) * S / 4 + 0.5, 0, 1) * sc.body * (0.5 + 0.5 * (cv.y < sc.dome[-1]))
    spine = spine_col * (0.8 + 0.2 * np.cos(2 * np.pi * (cv.y + 1) / 0.115))
    humeri = sum(cv.ellipse(s * 1.0, -0.74, 0.15, 0.14, soft=0.03) for s in (-1, 1))
    axilla = sum(np.exp(-(((cv.x - s * 0.915) / 0.025) ** 2)) * np.clip((cv.y + 0.55) / 0.2, 0, 1) * np.clip((0.5 - cv.y) / 0.3, 0, 1)
                 for s in (-1, 1))
    scap = np.zeros_like(sc.air)
    if sc.ap:
        scap_paths = [(_curve(lambda t, s=s: s * (0.58 + 0.12 * t), lambda t: -0.62 + 0.6 * t, 16), 0.02, 1.0) for s in (-1, 1)]
        scap = cv.lines(scap_paths, blur=0.006)
        scap += 0.5 * sum(np.clip((s * cv.x - 0.6 - 0.12 * (cv.y + 0.62) / 0.6) * 20, 0, 1) * (cv.y > -0.62) * (cv.y < -0.02) for s in (-1, 1))
    return spine, humeri, axilla, scap


def _airways(sc: _Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trachea, main bronchi and stomach gas (all lucent)."""
    cv, shift = sc.cv, sc.shift
    sc.tr_x = tr_x = sc.med_x + 0.01
    trachea = np.clip((0.032 - np.abs(cv.x - tr_x)) * sc.S / 4 + 0.5, 0, 1) * (cv.y < -0.30) * sc.body
    bronchi = cv.lines([([(tr_x, -0.31), (s * 0.17 + shift, -0.12)], 0.045, 1.0) for s in (-1, 1)], blur=0.006)
    gastric = cv.ellipse(0.40 + shift, sc.dome[1] + 0.13, 0.13, 0.065, soft=0.02) * (1 - sc.heart)
    return trachea, bronchi, gastric


def _support_devices(sc: _Scene, names: list[str], rd: np.random.Generator) -> np.ndarray:
    """Density of the support devices ``names`` (tubes, lines, pacemaker, sternal wires)."""
    cv, shift, tr_x, dome = sc.cv, sc.shift, sc.tr_x, sc.dome
    devices = np.zeros_like(sc.air)
    dev_paths = []
    for dev in names:
        if dev == "ett":  # tube walls in the trachea, tip above the carina
            tip = -0.45 + rd.uniform(-0.04, 0.04)
            for off in (-0.02, 0.02):
                dev_paths.append(([(tr_x + off, -1.0), (tr_x + off, tip)], 0.014, 1.0))
        elif dev == "ngt":  # down the oesophagus, through the left hemidiaphragm into the stomach
            P = [(tr_x + 0.03, -1.0), (tr_x + 0.04, 0.0), (0.05 + shift, dome[1] + 0.1), (0.40 + shift, dome[1] + 0.16)]
            dev_paths.append((_bezier(P, np.linspace(0, 1, 40)), 0.016, 1.0))
        elif dev == "cvc":  # internal jugular / subclavian line ending in the SVC
            s = -1 if rd.random() < 0.7 else 1
            P = [(s * 0.30 + shift, -1.0), (s * 0.22 + shift, -0.75), (-0.07 + shift, -0.55), (-0.07 + shift, -0.22)]
            dev_paths.append((_bezier(P, np.linspace(0, 1, 30)), 0.014, 1.0))
        elif dev == "pacemaker":  # generator in the left upper chest, two leads into the heart
            gx, gy = 0.55, -0.62
            devices += 0.6 * cv.ellipse(gx, gy, 0.10, 0.07, soft=0.01)
            for end in ((-0.02 + shift, dome[1] - 0.05), (-0.10 + shift, -0.02)):
                P = [(gx, gy), (gx - 0.25, gy - 0.05), (-0.08 + shift, -0.45), end]
                dev_paths.append((_bezier(P, np.linspace(0, 1, 30)), 0.014, 1.0))
        elif dev == "sternal_wires":
            for k in range(5):
                devices += 0.45 * (cv.ellipse(shift, -0.45 + 0.13 * k, 0.035, 0.018, soft=0.006)
                                   - cv.ellipse(shift, -0.45 + 0.13 * k, 0.022, 0.008, soft=0.006)).clip(0, 1)
    if dev_paths:
        devices += 0.5 * cv.lines(dev_paths, blur=0.002)
    return devices


def render_cxr(case: dict, psi, size: int, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Render (observed uint8 (size, size), canonical float32 (size, size) in [0, 1]).

    ``canonical`` is the noise-free image before the posture warp (for tests/diagnostics)."""
    sc = _Scene(case, size)
    cv, S, ss = sc.cv, sc.S, sc.ss
    ra = _rng(seed, index, "anatomy")
    rp = _rng(seed, index, "pathology")
    _anatomy_parameters(sc, ra)
    D = _masks(sc)
    _draw_air_pathology(sc, rp)
    air, extra, markings_keep = sc.air, sc.extra, sc.markings_keep
    vessels, hila, lungfield = _lung_markings(sc, _rng(seed, index, "vessels"))
    fracture = sc.find.get("Fracture")
    frac_side = (-1 if fracture["side"] == "right" else 1) if fracture else 0
    callus = np.zeros_like(air)
    ribs = _ribs(sc, fracture, frac_side, callus)
    clavicles = _clavicles(sc, fracture, frac_side, callus)
    spine, humeri, axilla, scap = _spine_and_shoulders(sc)
    trachea, bronchi, gastric = _airways(sc)

    # --- combine
    aerated = np.clip(1.3 * air, 0, 1)  # fluid / consolidation hide ribs and vessels (silhouetting)
    D -= 0.44 * air * (0.92 + 0.08 * np.clip(-cv.y, -1, 1)) * (1 + 0.05 * _smooth(ra, S, 10))  # bases denser
    D += 0.11 * vessels * lungfield * markings_keep * (0.3 + 0.7 * aerated) * (0.4 + 0.6 * np.clip(1 - np.abs(cv.x) / sc.width, 0, 1))
    D += 0.10 * hila * lungfield
    D += 0.11 * ribs * sc.body * (0.35 + 0.65 * lungfield * aerated) + 0.15 * clavicles + 0.07 * spine + 0.12 * humeri + 0.05 * scap + callus - 0.08 * axilla
    D -= 0.13 * trachea + 0.09 * bronchi * (1 - air) + 0.16 * gastric
    D += extra
    D += 0.015 * _smooth(ra, S, 12) * sc.body  # patient texture
    D += _support_devices(sc, case["devices"], _rng(seed, index, "devices"))

    canonical_hi = np.clip(D, 0, 1).astype(np.float32) ** 1.15
    # posture, then detector noise
    observed_hi = _warp_np(canonical_hi, psi)
    rn = _rng(seed, index, "noise")
    observed_hi = observed_hi + 0.012 * rn.standard_normal((S, S), dtype=np.float32)
    observed = _downsample(np.clip(observed_hi, 0, 1), ss)
    return (observed * 255 + 0.5).astype(np.uint8), _downsample(canonical_hi, ss)


def _warp_np(image: np.ndarray, psi) -> np.ndarray:
    """``warp_image`` for one (H, W) numpy image (same result to ~1e-5; no torch threads)."""
    H, W = image.shape
    A = psi_to_theta(torch.tensor(psi, dtype=torch.float64)).numpy()
    X, Y = np.meshgrid((np.arange(W) * 2 + 1) / W - 1, (np.arange(H) * 2 + 1) / H - 1)
    gx = A[0, 0] * X + A[0, 1] * Y + A[0, 2]
    gy = A[1, 0] * X + A[1, 1] * Y + A[1, 2]
    # grid_sample(align_corners=False) samples pixel coordinate ((g + 1) * size - 1) / 2
    coords = [((gy + 1) * H - 1) / 2, ((gx + 1) * W - 1) / 2]
    return map_coordinates(image, coords, order=1, mode="grid-constant", cval=0.0).astype(np.float32)


def _downsample(a: np.ndarray, ss: int) -> np.ndarray:
    S = a.shape[0]
    return a.reshape(S // ss, ss, S // ss, ss).mean(axis=(1, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- report

_SIZE = lambda sev: "small" if sev < 0.7 else "moderate" if sev < 0.88 else "large"  # noqa: E731
_DEGREE = lambda sev: "mild" if sev < 0.75 else "moderate" if sev < 0.92 else "severe"  # noqa: E731
_ORD = {4: "4th", 5: "5th", 6: "6th", 7: "7th", 8: "8th"}


def _phrase(cls: str, a: dict, rng: np.random.Generator) -> str:
    """A noun phrase for a present finding (no class synonyms of other classes)."""
    side, sev = a.get("side"), a["sev"]
    pick = lambda opts: opts[int(rng.integers(len(opts)))]  # noqa: E731
    if cls == "Atelectasis":
        base = "bibasilar" if side == "bilateral" else f"{side} basilar"
        return pick([f"{base} atelectasis", f"plate-like atelectasis at the {side} base" if side != "bilateral" else "bibasilar plate-like atelectasis",
                     f"{side} lower lobe atelectasis with volume loss" if side != "bilateral" else "bibasilar atelectasis with volume loss"])
    if cls == "Consolidation":
        return pick([f"{side} {a['lobe']} lobe consolidation", f"dense consolidation in the {side} {a['lobe']} lobe"])
    if cls == "Pneumothorax":
        return pick([f"{_SIZE(sev)} {side} pneumothorax", f"{_SIZE(sev)} {side} apical pneumothorax"])
    if cls == "Edema":
        return pick([f"{_DEGREE(sev)} pulmonary edema", f"{_DEGREE(sev)} interstitial pulmonary edema",
                     "perihilar edema consistent with fluid overload", "pulmonary vascular congestion with interstitial edema"])
    if cls == "Effusion":
        if side == "bilateral":
            return pick([f"{_SIZE(sev)} bilateral pleural effusions", f"bilateral pleural effusions, {_SIZE(sev)}"])
        return pick([f"{_SIZE(sev)} {side} pleural effusion", f"{_SIZE(sev)} {side} effusion with blunting of the costophrenic angle"])
    if cls == "Pneumonia":
        if a.get("multifocal"):
            return "multifocal pneumonia"
        return pick([f"{side} lower lobe pneumonia", f"{side} basilar pneumonia"])
    if cls == "Cardiomegaly":
        return pick([f"{_DEGREE(sev)} cardiomegaly", "enlarged cardiac silhouette", "cardiomegaly"])
    if cls == "Lung Lesion":
        if a["cm"] >= 3.0:
            return f"{a['cm']} cm {side} {a['zone']} lung mass"
        return pick([f"{a['cm']} cm nodule in the {side} {a['zone']} lung", f"{side} {a['zone']} lung pulmonary nodule measuring {a['cm']} cm"])
    if cls == "Fracture":
        if a["bone"] == "clavicle":
            return f"{side} clavicle fracture"
        return pick([f"{side} {_ORD[a['rib']]} rib fracture", f"fracture of the {side} {_ORD[a['rib']]} rib"])
    if cls == "Lung Opacity":
        return pick([f"{side} {a['zone']} lung opacity", f"hazy opacity in the {side} {a['zone']} lung",
                     f"ill-defined opacity in the {side} {a['zone']} lung"])
    if cls == "Enlarged Cardiomediastinum":
        return pick(["widened mediastinum", "enlarged cardiomediastinal silhouette", "mediastinal widening"])
    raise KeyError(cls)


def _hedge(phrase: str, rng: np.random.Generator) -> str:
    forms = ["Possible {p}.", "{P} cannot be excluded.", "Cannot exclude {p}.", "Questionable {p}.",
             "Findings may represent {p}.", "Findings suggestive of {p}."]
    f = forms[int(rng.integers(len(forms)))]
    return f.format(p=phrase, P=phrase[:1].upper() + phrase[1:])


_NEGATIONS = {
    "Pneumothorax": ["No pneumothorax."],
    "Effusion": ["No pleural effusion.", "No large pleural effusion."],
    "Consolidation": ["No focal consolidation."],
    "Edema": ["No pulmonary edema."],
    "Pneumonia": ["No evidence of pneumonia."],
    "Cardiomegaly": ["Heart size is normal."],
    "Fracture": ["No acute fracture."],
    "Enlarged Cardiomediastinum": ["Normal mediastinal contours."],
    # without these three, test reports only ever name them positively or hedged, and their
    # AUROC (CXRL Table 3) is undefined
    "Atelectasis": ["No atelectasis."],
    "Lung Lesion": ["No suspicious pulmonary nodule or mass.", "No pulmonary nodules."],
    "Lung Opacity": ["No focal opacity."],
}
_NEG_WORD = {"Pneumothorax": "pneumothorax", "Effusion": "pleural effusion", "Consolidation": "focal consolidation",
             "Edema": "pulmonary edema"}
_DEVICE_TEXT = {
    "ett": ["Endotracheal tube terminates approximately 4 cm above the carina.", "Endotracheal tube in standard position."],
    "ngt": ["Nasogastric tube courses below the diaphragm into the stomach.", "Enteric tube tip in the stomach."],
    "cvc": ["Central venous catheter tip in the SVC.", "Right internal jugular line terminates in the SVC."],
    "pacemaker": ["Left-sided pacemaker with leads in the right atrium and right ventricle."],
    "sternal_wires": ["Median sternotomy wires are intact."],
}
_FINDINGS_NORMAL = {
    "lungs": ["The lungs are clear.", "Lungs are well expanded and clear."],
    "heart": ["The cardiomediastinal silhouette is within normal limits.", "Heart size is normal."],
    "pleura": ["There is no pleural effusion or pneumothorax.", "No pleural abnormality."],
    "bones": ["Osseous structures are intact.", "No acute osseous abnormality."],
}
_LUNG_CLASSES = {"Atelectasis", "Consolidation", "Edema", "Pneumonia", "Lung Lesion", "Lung Opacity"}


def write_report(case: dict, seed: int, index: int) -> tuple[str, dict[str, float]]:
    """(report text, CheXpert-style labels of its IMPRESSION: 1 / 0 / -1 / NaN)."""
    rng = _rng(seed, index, "report")
    pick = lambda opts: opts[int(rng.integers(len(opts)))]  # noqa: E731
    find = case["findings"]
    labels = {c: math.nan for c in PATHOLOGIES}
    impression: list[str] = []
    ordered = [c for c in PATHOLOGIES if c in find]
    ordered.sort(key=lambda c: find[c]["value"] != 1)  # positives first, hedged after
    phrases = {c: _phrase(c, find[c], rng) for c in ordered}
    done: set[str] = set()
    for c in ordered:
        if c in done:
            continue
        a = find[c]
        if a["value"] == 1:
            if (c == "Consolidation" and find.get("Pneumonia", {}).get("value") == 1
                    and find["Pneumonia"].get("side") == a.get("side")):
                s = f"{phrases[c]} consistent with pneumonia."
                labels["Pneumonia"] = 1.0
                done.add("Pneumonia")
            else:
                s = phrases[c] + "."
                if rng.random() < 0.15:  # comparison wording ("no change in" is not a negation)
                    s = pick(["Unchanged {p}.", "No significant change in {p}.", "Slightly increased {p}."]).format(p=phrases[c])
            impression.append(s[:1].upper() + s[1:])
            labels[c] = 1.0
        else:
            impression.append(_hedge(phrases[c], rng))
            labels[c] = -1.0
        done.add(c)
    impression += [pick(_DEVICE_TEXT[d]) for d in case["devices"]]
    absent = [c for c in _NEGATIONS if c not in find]
    if not find and rng.random() < 0.7:
        impression.append("No acute cardiopulmonary process.")
        negated = list(rng.choice(absent, size=int(rng.integers(0, 2)), replace=False)) if absent else []
    else:
        n_neg = int(rng.integers(1, 4)) if len(find) <= 1 else int(rng.integers(0, 2))  # keep impressions short-ish
        negated = list(rng.choice(absent, size=min(len(absent), n_neg), replace=False)) if absent else []
    negated = [c for c in _NEGATIONS if c in negated]  # stable order
    listable = [c for c in negated if c in _NEG_WORD]
    if len(listable) >= 2 and rng.random() < 0.5:  # "No pneumothorax or pleural effusion."
        words = [_NEG_WORD[c] for c in listable]
        impression.append("No " + (", ".join(words[:-1]) + (", or " if len(words) > 2 else " or ") + words[-1]) + ".")
        rest = [c for c in negated if c not in listable]
    else:
        rest = negated
    for c in rest:
        if c in _NEG_WORD and rng.random() < 0.15:  # resolved since a prior study
            impression.append(pick(["Interval resolution of the previously seen {w}.", "Previously seen {w} has resolved."])
                              .format(w=_NEG_WORD[c]))
        else:
            impression.append(pick(_NEGATIONS[c]))
    for c in negated:
        labels[c] = 0.0

    findings: list[str] = ["PA and lateral views of the chest." if case["view"] == "PA" else "Portable AP upright view of the chest."]
    for c in ordered:
        a = find[c]
        p = phrases[c]
        findings.append(("There is " if a["value"] == 1 else "There is possible ") + p + ".")
    if not (_LUNG_CLASSES & set(find)):
        findings.append(pick(_FINDINGS_NORMAL["lungs"]))
    if not ({"Cardiomegaly", "Enlarged Cardiomediastinum"} & set(find)):
        findings.append(pick(_FINDINGS_NORMAL["heart"]))
    if not ({"Effusion", "Pneumothorax"} & set(find)):
        findings.append(pick(_FINDINGS_NORMAL["pleura"]))
    if "Fracture" not in find:
        findings.append(pick(_FINDINGS_NORMAL["bones"]))
    findings += [pick(_DEVICE_TEXT[d]) for d in case["devices"]]
    exam = "CHEST (PA AND LAT)" if case["view"] == "PA" else "CHEST (PORTABLE AP)"
    indication = pick(["Cough.", "Shortness of breath.", "Fever.", "Chest pain.", "Evaluate for interval change.",
                       "Preoperative evaluation.", "Hypoxia."])
    report = (f"FINAL REPORT\nEXAMINATION: {exam}\n\nINDICATION: {indication}\n\n"
              f"FINDINGS:\n{' '.join(findings)}\n\nIMPRESSION:\n{' '.join(impression)}\n")
    return report, labels


# ----------------------------------------------------------------------------- dataset


def _assign(n: int, fracs: dict[str, float], rng: np.random.Generator) -> list[str]:
    """Exact-count allocation (largest remainder) in random order."""
    raw = {k: v * n for k, v in fracs.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    out = [k for k, c in counts.items() for _ in range(c)]
    return [out[i] for i in rng.permutation(n)]


def generate_cxr_phantoms(out_dir: Path, n_images: int, size: int, seed: int, frac_ap: float) -> dict:
    """Write ``n_images`` CXR phantoms to ``out_dir``: images/, metadata.csv, grid.png.

    Splits are allocated exactly (75/5/20 train/validate/test; the test share is raised
    from MIMIC's so that the default 200 PA test pairs exist among 1600 phantoms) and the
    AP fraction is exact within each split."""
    if n_images < 1 or size < 16 or not 0 <= frac_ap <= 1:
        raise DataError(f"generate_cxr_phantoms: n_images={n_images}, size={size}, frac_ap={frac_ap}; "
                        "expected n_images >= 1, size >= 16, 0 <= frac_ap <= 1")
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 7])
    splits = _assign(n_images, SPLIT_FRACTIONS, rng)
    views = [""] * n_images
    for sp in SPLIT_FRACTIONS:
        idx = [i for i, s in enumerate(splits) if s == sp]
        for i, v in zip(idx, _assign(len(idx), {"AP": frac_ap, "PA": 1 - frac_ap}, rng)):
            views[i] = v
    rows = []
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for i in progress(range(n_images), desc="cxr phantoms", total=n_images):
            case = sample_case(seed, i, views[i])
            psi = sample_psi(seed, i, views[i])
            img, _ = render_cxr(case, psi, size, seed, i)
            report, labels = write_report(case, seed, i)
            name = f"PHX_{i + 1:07d}"
            Image.fromarray(img, "L").save(tmp / "images" / f"{name}.png")
            rows.append({
                "image": name, "subject_id": 10_000_000 + i, "study_id": 50_000_000 + i, "view": views[i],
                "split": splits[i], "report": report, **labels, DEVICES_COL: 1.0 if case["devices"] else math.nan,
                **dict(zip(PSI_NAMES, psi)),
            })
        df = pd.DataFrame(rows)[METADATA_COLUMNS]
        write_table(df, tmp / "metadata.csv")
        _write_grid(tmp, df)
    metrics: dict[str, float] = {"n_images": float(n_images), "size": float(size), "seconds": time.perf_counter() - t0}
    for c in PATHOLOGIES:
        metrics[f"positive_{c}"] = float((df[c] == 1).mean())
        metrics[f"uncertain_{c}"] = float((df[c] == -1).mean())
    metrics["positive_Support Devices"] = float((df[DEVICES_COL] == 1).mean())
    metrics["no_finding"] = float(((df[PATHOLOGIES] == 1) | (df[PATHOLOGIES] == -1)).sum(axis=1).eq(0).mean())
    metrics["frac_ap"] = float((df.view == "AP").mean())
    for sp in SPLIT_FRACTIONS:
        metrics[f"n_{sp}"] = float((df.split == sp).sum())
    metrics["n_test_pa"] = float(((df.split == "test") & (df.view == "PA")).sum())
    return metrics


def _write_grid(root: Path, df: pd.DataFrame) -> None:
    """grid.png: 32 images, first one positive example per class (+ devices), then the rest in order."""
    from medrl.io import load_image

    chosen: list[str] = []
    for c in [*PATHOLOGIES, DEVICES_COL]:
        hit = df.loc[(df[c] == 1) & ~df.image.isin(chosen), "image"]
        if len(hit):
            chosen.append(hit.iloc[0])
    chosen += [i for i in df.image if i not in chosen][: 32 - len(chosen)]
    tiles = [load_image(root / "images" / f"{c}.png", mode="L") for c in chosen[:32]]
    if tiles:
        save_image(image_grid(tiles, nrow=8, pad=2), root / "grid.png")


__all__ = [
    "generate_cxr_phantoms", "render_cxr", "sample_case", "sample_psi", "write_report",
    "psi_to_theta", "invert_theta", "affine_grid", "warp_image", "PSI_NAMES", "METADATA_COLUMNS",
]
