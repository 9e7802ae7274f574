"""CXRL diagnostic model: the torchxrayvision DenseNet-121 classifier (paper Sec. 2.3.2).

The network is always ``torchxrayvision.models.DenseNet`` built with ``weights=None`` (that
is the only constructor path that never downloads); weights are loaded by us from a local
file. Inputs follow xrv's own convention: 1 channel, values scaled to [-1024, 1024] as
``xrv.utils.normalize`` does ((2 x - 1) * 1024 for x in [0, 1]; RGB is averaged to gray),
at the model's input resolution (224 for the released weights; for the embedded default the
size it was trained at, i.e. the phantom/prepare size, 64). ``predict_probs`` does all of it.

Output order is the model's ``pathologies`` list (xrv names: "Effusion", "Lung Lesion",
"Enlarged Cardiomediastinum", ...), mapped by exact name to our 11 classes
(``medrl.data.reports.PATHOLOGIES``); a class the weights do not predict (xrv marks those
with "") is an error, never a silent zero.

Embedded default: the same class with a smaller config, ``growth_rate`` from params (12 vs
32), the DenseNet-121 ``block_config`` (6, 12, 24, 16) kept, ``num_init_features`` =
2 * growth_rate (the DenseNet-BC rule; 64 for the real model), 11 outputs in our order.

Weights files (``build_diag(weights=...)``)
-------------------------------------------
* ``.safetensors``: an xrv DenseNet state dict; optional metadata ``pathologies`` (JSON
  list), ``op_threshs`` (JSON list) and ``input_resolution``. Our own model directories store
  exactly this (``model.safetensors``), so real and embedded models load the same way.
* ``.pt``/``.pth``: a state dict readable with ``torch.load(weights_only=True)``.
The file torchxrayvision downloads (e.g.
``nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``)
is a whole pickled model, which weights_only refuses (unpickling it can run code). Convert it
once, on a machine you trust, keeping its name so the labels and operating points are found::

    python -c "import torch,sys; from safetensors.torch import save_file; m=torch.load(sys.argv[1], map_location='cpu', weights_only=False); save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1].rsplit('.', 1)[0] + '.safetensors')" FILE.pt

Architecture (growth rate, blocks, classes) is read from the tensor shapes. Labels, xrv's
per-class operating thresholds (``op_threshs``: outputs are rescaled so that each threshold
maps to 0.5, which is what makes the reward's 0.5 cut meaningful) and the input resolution
come from the file's metadata, else from ``xrv.models.model_urls`` when the file name is that
of a released weights file, else from the ``pathologies=`` argument.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medrl.data.reports import PATHOLOGIES
from medrl.checkpoints import discard_train_state, fingerprint
from medrl.errors import DataError
from medrl.io import atomic_dir, read_json, write_json
from medrl.lr_schedule import cosine_lr
from medrl.models.training import (
    TORCH_LOAD_ERRORS,
    images_from_pairs,
    recalibrate_bn,
    resume_epochs,
    save_epoch,
    split_rows,
    to_unit,
)
from medrl.progress import progress

__all__ = [
    "TRAIN_UNMENTIONED",
    "UNMENTIONED",
    "XRV_INPUT_RESOLUTION",
    "build_diag",
    "diag_accuracy",
    "finding_recall",
    "label_accuracy",
    "label_targets",
    "load_diag",
    "predict_probs",
    "save_diag",
    "train_diag",
    "xrv_normalize",
]

XRV_INPUT_RESOLUTION = 224
XRV_BLOCK_CONFIG = (6, 12, 24, 16)


def _xrv():
    import torchxrayvision as xrv

    return xrv


# ----------------------------------------------------------------------------- weights files


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from a .safetensors or weights_only-loadable .pt file."""
    if not path.is_file():
        raise DataError(f"{path}: diagnostic-model weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open is no dict)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        raise DataError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}); the files "
            "torchxrayvision downloads are whole pickled models: convert once to a state dict with the "
            "command in medrl.models.xrv_diag's docstring, then pass the .safetensors file"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path}: expected a state dict of tensors (xrv DenseNet keys features.*, classifier.*)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def _arch_from_state(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    need = ["features.conv0.weight", "features.denseblock1.denselayer1.conv1.weight",
            "features.denseblock1.denselayer1.conv2.weight", "classifier.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise DataError(f"{path}: not an xrv DenseNet state dict (missing {missing})")
    growth = sd["features.denseblock1.denselayer1.conv2.weight"].shape[0]
    blocks = []
    b = 1
    while f"features.denseblock{b}.denselayer1.conv1.weight" in sd:
        n = 1
        while f"features.denseblock{b}.denselayer{n + 1}.conv1.weight" in sd:
            n += 1
        blocks.append(n)
        b += 1
    return {
        "growth_rate": int(growth),
        "block_config": tuple(blocks),
        "num_init_features": int(sd["features.conv0.weight"].shape[0]),
        "bn_size": int(sd["features.denseblock1.denselayer1.conv1.weight"].shape[0] // growth),
        "num_classes": int(sd["classifier.weight"].shape[0]),
        "in_channels": int(sd["features.conv0.weight"].shape[1]),
    }


def _released_entry(path: Path) -> dict[str, Any] | None:
    """The xrv.models.model_urls entry whose released file has this file's stem."""
    stem = path.name.split(".")[0]
    for entry in _xrv().models.model_urls.values():
        url = entry.get("weights_url", "")
        if url and url.rsplit("/", 1)[-1].split(".")[0] == stem and "labels" in entry:
            return entry
    return None


def _class_index(pathologies: Sequence[str], classes: Sequence[str], source: str) -> list[int]:
    missing = [c for c in classes if c not in pathologies]
    if missing:
        raise DataError(f"{source}: the model does not predict {missing}; its outputs are {list(pathologies)}, expected all of {list(classes)}")
    return [list(pathologies).index(c) for c in classes]


def build_diag(
    weights: str | Path | None = None,
    *,
    growth_rate: int = 32,
    n_classes_order: Sequence[str] = PATHOLOGIES,
    num_init_features: int | None = None,
    input_size: int | None = None,
    pathologies: Sequence[str] | None = None,
):
    """An ``xrv.models.DenseNet``: untrained embedded-default config when ``weights`` is None
    (``growth_rate``, num_init_features = 2 * growth_rate, outputs = ``n_classes_order``),
    else loaded from a local weights file (see the module doc; never downloads).

    The model carries ``pathologies`` (its output names), ``medrl_classes``,
    ``medrl_index`` (outputs -> our classes) and ``medrl_input_size``."""
    xrv = _xrv()
    classes = list(n_classes_order)
    op_threshs = None
    if input_size is not None and input_size < 32:
        # stem (/4) and three transitions (/8) leave a 0-pixel map below 32 px
        raise DataError(f"input_size={input_size}: the DenseNet-121 layout needs at least 32 px")
    if weights is None:
        nif = num_init_features or 2 * growth_rate
        arch = {"growth_rate": growth_rate, "block_config": XRV_BLOCK_CONFIG, "num_init_features": nif,
                "bn_size": 4, "num_classes": len(classes), "in_channels": 1}
        names, res, sd = classes, input_size, None
    else:
        path = Path(weights)
        sd, meta = _read_weights(path)
        arch = _arch_from_state(sd, path)
        entry = _released_entry(path)
        if "pathologies" in meta:
            names = json.loads(meta["pathologies"])
        elif pathologies is not None:
            names = list(pathologies)
        elif entry is not None:
            names = list(entry["labels"])
        else:
            raise DataError(
                f"{path}: cannot tell which pathology each of the {arch['num_classes']} outputs is; store "
                "'pathologies' in the safetensors metadata, keep the released file name, or pass pathologies="
            )
        if len(names) != arch["num_classes"]:
            raise DataError(f"{path}: {len(names)} pathology names for {arch['num_classes']} outputs")
        if "op_threshs" in meta:
            op_threshs = torch.tensor(json.loads(meta["op_threshs"]), dtype=torch.float32)
        elif "op_threshs" in sd:
            op_threshs = sd["op_threshs"].float()
        elif entry is not None and "op_threshs" in entry:
            op_threshs = torch.tensor(np.asarray(entry["op_threshs"], dtype=np.float32))
        res = input_size or int(meta.get("input_resolution") or (entry or {}).get("input_resolution") or XRV_INPUT_RESOLUTION)
    model = xrv.models.DenseNet(weights=None, num_classes=arch["num_classes"], growth_rate=arch["growth_rate"],
                                block_config=arch["block_config"], num_init_features=arch["num_init_features"],
                                bn_size=arch["bn_size"], in_channels=arch["in_channels"])
    if sd is not None:
        sd = {k: v for k, v in sd.items() if k != "op_threshs"}
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise DataError(f"{weights}: state dict does not fit an xrv DenseNet {arch} ({e})") from None
    if op_threshs is not None:
        model.op_threshs = op_threshs  # xrv forward then returns sigmoid outputs rescaled so threshold -> 0.5
    model.pathologies = list(names)
    model.targets = list(names)
    model.medrl_arch = dict(arch, block_config=list(arch["block_config"]))
    model.medrl_classes = classes
    model.medrl_index = _class_index(names, classes, str(weights) if weights else "build_diag")
    model.medrl_input_size = res
    return model.eval()


def save_diag(model, out_dir: str | Path, metrics: dict[str, Any] | None = None) -> None:
    """Write ``out_dir/{model.safetensors (xrv state dict + metadata), config.json, eval.json}``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    # One metadata key: safetensors writes its metadata map in a random order per process, so
    # two keys would make identical models differ by file hash. The input size is in config.json,
    # the thresholds travel as a tensor (build_diag reads both forms).
    meta = {"pathologies": json.dumps(list(model.pathologies))}
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "op_threshs"}
    if getattr(model, "op_threshs", None) is not None:
        sd["op_threshs"] = model.op_threshs.detach().float().contiguous()
    with atomic_dir(out_dir) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata=meta)
        write_json(tmp / "config.json", {"arch": model.medrl_arch, "pathologies": list(model.pathologies),
                                         "classes": list(model.medrl_classes), "input_size": model.medrl_input_size,
                                         "normalisation": "xrv: gray, (2x-1)*1024"})
        write_json(tmp / "eval.json", metrics or {})


def load_diag(path: str | Path, device: str = "cpu", n_classes_order: Sequence[str] = PATHOLOGIES):
    """Load a directory written by ``train_diag``/``save_diag``, or a weights file."""
    path = Path(path)
    if path.is_dir():
        cfg = read_json(path / "config.json")
        model = build_diag(path / "model.safetensors", n_classes_order=n_classes_order, input_size=cfg.get("input_size"))
    else:
        model = build_diag(path, n_classes_order=n_classes_order)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- inference


def xrv_normalize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """[0, 1] (B, 1|3, H, W) -> xrv input: gray, resized to ``size``, scaled to [-1024, 1024]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (B, 1|3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (2.0 * x.clamp(0, 1) - 1.0) * 1024.0


def _outputs(model, x: torch.Tensor) -> torch.Tensor:
    """Probabilities in the model's own output order (op_threshs-rescaled when present)."""
    out = model(x)
    if getattr(model, "op_threshs", None) is not None or getattr(model, "apply_sigmoid", False):
        return out
    return torch.sigmoid(out)


@torch.no_grad()
def predict_probs(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(B, 11) probabilities in ``model.medrl_classes`` order for [0, 1] images (B, 1|3, H, W)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = torch.tensor(model.medrl_index)
    out = []
    for i in range(0, len(images), batch_size):
        x = xrv_normalize(images[i : i + batch_size], model.medrl_input_size).to(device)
        out.append(_outputs(model, x).float().cpu()[:, idx])
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(idx))


# ----------------------------------------------------------------------------- labels


UNMENTIONED = ("negative", "ignore")
# How train_diag reads a class a report does not mention (NaN): a negative. The CXR AUROC
# (medrl.metrics.cxr_eval) scores the model with the same reading.
TRAIN_UNMENTIONED = "negative"


def label_targets(labels: np.ndarray | torch.Tensor, unmentioned: str = "negative") -> tuple[torch.Tensor, torch.Tensor]:
    """CheXpert values (1 / 0 / -1 / NaN) -> (target, mask).

    1 -> positive; 0 -> negative; -1 (uncertain) -> masked out ("U-Ignore", as torchxrayvision
    trains: its datasets map uncertain to NaN = no loss); NaN (not mentioned) -> negative, or
    masked out too with ``unmentioned="ignore"``."""
    if unmentioned not in UNMENTIONED:
        raise ValueError(f"unmentioned={unmentioned!r}; expected one of {UNMENTIONED}")
    lab = torch.as_tensor(np.array(labels, dtype=np.float32))  # a copy: pandas arrays may be read-only
    target = (lab == 1).float()
    mask = (lab != -1).float()
    if unmentioned == "ignore":
        mask = mask * (~torch.isnan(lab)).float()
    return target, mask


def label_accuracy(
    probs: torch.Tensor, labels: np.ndarray | torch.Tensor, threshold: float = 0.5, unmentioned: str = "negative"
) -> torch.Tensor:
    """Per-image accuracy of thresholded predictions against report labels (B,).

    Compared classes: stated positive (1), stated negative (0) and, with
    ``unmentioned="negative"``, not mentioned (NaN, read as negative, the reading a
    radiologist's silence has); uncertain (-1) classes are left out. An image with no
    comparable class scores 0. As a reward, "negative" pays for erasing findings: most
    classes of a report are unmentioned, so an image the model reads as normal scores high
    (docs/NOTEBOOK.md, CXR-07); "ignore" compares the stated classes only."""
    target, mask = label_targets(labels, unmentioned)
    pred = (probs.float().cpu() >= threshold).float()
    hits = ((pred == target).float() * mask).sum(-1)
    n = mask.sum(-1)
    return torch.where(n > 0, hits / n.clamp(min=1), torch.zeros_like(n))


def finding_recall(probs: np.ndarray | torch.Tensor, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per image, the share of the classes its report states as present (1) that the model
    predicts (p >= threshold); NaN for an image whose report states none. A reward the
    policy satisfies by erasing findings shows here first (docs/NOTEBOOK.md, CXR-07)."""
    pred = np.asarray(probs, dtype=np.float64) >= threshold
    pos = np.asarray(labels, dtype=np.float32) == 1
    n = pos.sum(-1)
    return np.where(n > 0, (pred & pos).sum(-1) / np.maximum(n, 1), np.nan)


# ----------------------------------------------------------------------------- training


def _auroc(prob: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    keep = ~np.isnan(y)
    y, prob = y[keep], prob[keep]
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, prob))


def diag_accuracy(probs: np.ndarray, test: pd.DataFrame, classes: Sequence[str] = PATHOLOGIES) -> dict[str, Any]:
    """Per-class and macro AUROC of ``probs`` (N, C) on the held-out ``test`` pairs against the
    exact labels ``gt_<class>`` (phantoms: the generator's truth), or the report labels when the
    pairs have none (real data; uncertain -1 left out, unmentioned negative); ``reference`` says
    which."""
    gt_cols = [f"gt_{c}" for c in classes]
    exact = all(c in test.columns for c in gt_cols)
    y = test[gt_cols if exact else list(classes)].to_numpy(np.float32)
    y = np.where(y == -1, np.nan, (y == 1).astype(np.float32)) if not exact else \
        np.where(np.isnan(y), np.nan, (y == 1).astype(np.float32))
    per = {c: _auroc(probs[:, j], y[:, j]) for j, c in enumerate(classes)}
    ok = [v for v in per.values() if not math.isnan(v)]
    return {"reference": "exact labels (gt_*)" if exact else "report labels", "n": int(len(test)),
            "auroc": {**per, "avg": float(np.mean(ok)) if ok else float("nan")}}


def _check_labels(pairs: pd.DataFrame, classes: Sequence[str]) -> None:
    missing = [c for c in ["path", "split", *classes] if c not in pairs.columns]
    if missing:
        raise DataError(f"pairs: missing columns {missing}; expected path, split and the pathology columns {list(classes)}")
    vals = pairs[list(classes)].to_numpy(np.float64)
    bad = ~(np.isnan(vals) | np.isin(vals, (1.0, 0.0, -1.0)))
    if bad.any():
        col = list(classes)[int(np.argwhere(bad)[0][1])]
        raise DataError(f"pairs: column '{col}' has values outside {{1, 0, -1, empty}}")


def train_diag(
    pairs: pd.DataFrame,
    out_dir: str | Path,
    *,
    size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    growth_rate: int,
    seed: int,
    ckpt_dir: str | Path,
    device: str = "cpu",
    base: str | Path | None = None,
    operating_point: str = "none",
) -> dict[str, float]:
    """Train the embedded-default xrv DenseNet on ``split == train`` with masked multi-label
    BCE over the 11 classes (labels via ``label_targets``: NaN negative, -1 ignored), AdamW +
    cosine schedule, checkpoint/resume per epoch in ``ckpt_dir``; BatchNorm statistics are
    re-estimated with the final weights. Evaluates on ``split == test``: per-class AUROC
    against the report labels (1 vs 0/NaN, uncertain left out) and, when the pairs carry
    ``gt_<class>`` columns (phantoms), against the true labels; plus the reward's accuracy.
    ``operating_point="youden"`` then sets per-class ``op_threshs`` (``youden_thresholds`` on the
    training images), as torchxrayvision's released weights carry them, so that the reward's 0.5
    cut is each class's operating point; "none" keeps the plain sigmoid and its 0.5 cut.
    Writes ``out_dir`` (``save_diag`` layout) and returns the metrics."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    classes = list(PATHOLOGIES)
    _check_labels(pairs, classes)
    train, test = split_rows(pairs, "train"), split_rows(pairs, "test")
    if len(train) == 0:
        raise DataError("pairs: no rows with split == 'train'")
    x_train = images_from_pairs(train, size, base=base, desc="diag: load train")
    y_train, m_train = label_targets(train[classes].to_numpy(np.float32), unmentioned=TRAIN_UNMENTIONED)

    torch.manual_seed(seed)
    model = build_diag(None, growth_rate=growth_rate, input_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(x_train)
    # a trailing batch of one image is dropped: BatchNorm cannot train on it (e.g. a judge's half of the pairs)
    steps = max(1, n // batch_size + int(n % batch_size > 1))
    total_steps = steps * epochs
    ckpt = ckpt_dir / "diag"
    ckpt_config = {"fingerprint": fingerprint(n=n, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
                                              growth_rate=growth_rate, seed=seed, images=list(train["path"]))}
    start, history = resume_epochs(ckpt, ckpt_config, model, opt)

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        total = 0.0
        for i in progress(range(steps), desc=f"diag epoch {epoch + 1}/{epochs}"):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lr, epoch * steps + i, total_steps, warmup=min(steps, total_steps // 10))
            idx = perm[i * batch_size : (i + 1) * batch_size]
            total += _diag_step(model, opt, x_train, y_train, m_train, idx, device)
        history.append({"epoch": epoch + 1, "train_loss": total / n, "seconds": time.perf_counter() - t0})
        save_epoch(ckpt, ckpt_config, model, opt, epoch + 1, history)

    recalibrate_bn(model, [xrv_normalize(to_unit(x_train[i : i + 256]), None) for i in range(0, n, 256)], device)
    model = model.cpu().eval()
    if operating_point == "youden":
        probs = predict_probs(model, to_unit(x_train)).numpy()
        thr = youden_thresholds(probs, y_train.numpy(), m_train.numpy())
        op = torch.full((len(model.pathologies),), 0.5)
        op[torch.tensor(model.medrl_index)] = thr
        model.op_threshs = op
    elif operating_point != "none":
        raise DataError(f"classifiers.diag.operating_point: {operating_point!r}; expected 'youden' or 'none'")
    metrics: dict[str, float] = {
        "train_loss_final": float(history[-1]["train_loss"]) if history else float("nan"),
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else float("nan"),
        "epochs": float(epochs),
    }
    if len(test):
        metrics.update(_diag_test_metrics(model, test, classes, size, base))
    save_diag(model, out_dir, {"metrics": metrics, "history": history, "label_policy": "NaN->0, -1 masked"})
    discard_train_state(ckpt)
    return metrics


def youden_thresholds(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """Per class (column), the probability cut that maximises Youden's J (TPR - FPR) over the
    images whose label counts (``mask``): the operating point a 0.5 cut on op_norm-rescaled outputs
    then applies. A class without both a positive and a negative keeps 0.5."""
    from sklearn.metrics import roc_curve

    out = np.full(probs.shape[1], 0.5, dtype=np.float32)
    for j in range(probs.shape[1]):
        keep = mask[:, j] > 0
        y, p = targets[keep, j], probs[keep, j]
        if len(y) == 0 or y.min() == y.max():
            continue
        fpr, tpr, thr = roc_curve(y, p)
        out[j] = float(np.clip(thr[int(np.argmax(tpr - fpr))], 1e-4, 1 - 1e-4))
    return torch.from_numpy(out)


def _diag_step(model: nn.Module, opt: torch.optim.Optimizer, x_train: torch.Tensor, y_train: torch.Tensor,
               m_train: torch.Tensor, idx: torch.Tensor, device: str) -> float:
    """One masked-BCE step on the batch ``idx``; returns its loss times the batch size."""
    logits = model(xrv_normalize(to_unit(x_train[idx]), None).to(device))
    y, m = y_train[idx].to(device), m_train[idx].to(device)
    loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * m).sum() / m.sum().clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()) * len(idx)


def _diag_test_metrics(model: nn.Module, test: pd.DataFrame, classes: list[str], size: int,
                       base: str | Path | None) -> dict[str, float]:
    """Reward accuracy and per-class/macro AUROC on the test pairs, against the report labels and
    (phantoms) the true labels."""
    metrics: dict[str, float] = {}
    x_test = images_from_pairs(test, size, base=base, desc="diag: load test")
    probs = predict_probs(model, to_unit(x_test)).numpy()
    labels = test[classes].to_numpy(np.float32)
    metrics["test_n"] = float(len(test))
    metrics["test_label_accuracy"] = float(label_accuracy(torch.from_numpy(probs), labels).mean())
    ref = np.where(labels == -1, np.nan, (labels == 1).astype(np.float32))
    sets = [("auroc", ref)]
    gt_cols = [f"gt_{c}" for c in classes]
    if all(c in test.columns for c in gt_cols):
        gt = test[gt_cols].to_numpy(np.float32)
        sets.append(("auroc_gt", np.where(np.isnan(gt), np.nan, (gt == 1).astype(np.float32))))
    for name, y in sets:
        per = [_auroc(probs[:, j], y[:, j]) for j in range(len(classes))]
        for c, v in zip(classes, per):
            metrics[f"{name}_{c}"] = v
        ok = [v for v in per if not math.isnan(v)]
        metrics[f"{name}_macro"] = float(np.mean(ok)) if ok else float("nan")
    return metrics
