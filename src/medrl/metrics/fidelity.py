"""FID and KID through torch-fidelity, with bootstrap CIs from cached features.

Feature networks are *registered* torch-fidelity extractors (``register_feature_extractor``,
subclasses of ``FeatureExtractorBase``) and features are extracted with torch-fidelity's own
loop (``torch_fidelity.utils.get_featuresdict_from_dataset``):

* ``"inception-v3-compat"`` — the standard FID Inception (pool3, 2048-d), weights from a LOCAL
  file (``metrics.inception_weights``, torch-fidelity's ``feature_extractor_weights_path``).
  Never downloaded: a missing path is a DataError. The file is loaded with
  ``weights_only=True`` enforced (torch-fidelity itself would unpickle it freely).
* any ``nn.Module`` / ``ModuleExtractorSpec`` — e.g. the pipeline-trained ISIC EfficientNet or
  the CXR DenseNet-121 (CXRL computes FID with CXR DenseNet-121 features). The spec says how a
  uint8 RGB batch becomes the network input (resize, grey, mean/std) and which callable returns
  the penultimate features.

Point estimates are torch-fidelity's: ``fid_statistics_to_metric(fid_features_to_statistics())``
and ``kid_features_to_metric`` (mean/std over ``kid_subsets`` random subsets). We do not call
``calculate_metrics`` itself because (a) the bootstrap needs the features, so they are
extracted once and reused, and (b) its on-disk cache unpickles with ``weights_only=False``;
our optional cache (``cache_dir``) stores features as safetensors keyed by the content hash of
the images and of the network. ``tests/test_metrics.py`` checks the numbers equal
``torch_fidelity.calculate_metrics`` on the same inputs.

Confidence intervals (features computed once, items resampled):

* Both sets are resampled (the real test set is a sample too); the index matrices depend only
  on (seed, n_real, n_fake), and inputs are sorted by their ``<parent>/<file>`` key, so two
  models whose samples share file names get identical resamples -> paired differences.
* FID replicate: exact FID of the resampled sets, computed without forming D x D matrices:
  with A, B the centred (count-weighted) feature rows scaled by 1/sqrt(n-1),
  ``tr sqrt(S_a S_b) = ||A B^T||_*`` (nuclear norm of an n x m matrix), so
  ``FID = |mu_a - mu_b|^2 + ||A||_F^2 + ||B||_F^2 - 2 ||A B^T||_*``.
* FID is biased upwards in finite samples and resampling adds that bias again (a percentile
  interval often lies entirely above the estimate), so FID uses the *basic* bootstrap
  interval ``[2 v - q_hi, 2 v - q_lo]``, which removes the first-order bias; lo is clipped at 0.
* KID replicate: the unbiased MMD^2 (torch-fidelity's polynomial kernel) of the full resampled
  sets, excluding pairs that are copies of the same item so it stays unbiased; KID is
  unbiased, so the percentile interval is used. Its value is torch-fidelity's subset mean.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset

from medrl.errors import DataError
from medrl.io import atomic_path, hash_file
from medrl.metrics.bootstrap import boot_counts, boot_key, metric_from_reps
from medrl.progress import progress

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
INCEPTION = "inception-v3-compat"
_LOCAL_INCEPTION = "medrl-inception-v3-compat"
# id(spec or module) -> (that object, its spec, torch-fidelity registry name)
_REGISTERED: dict[int, tuple[Any, "ModuleExtractorSpec", str]] = {}


# ----------------------------------------------------------------------------- inputs


def list_images(src: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder (recursively) or a list of paths -> image paths sorted by ``<parent>/<name>``."""
    if isinstance(src, (str, Path)):
        root = Path(src)
        if not root.is_dir():
            raise DataError(f"{root}: not a directory; expected a folder of PNG/JPG images")
        paths = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")]
    else:
        paths = [Path(p) for p in src]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: image file not found")
    return sorted(paths, key=lambda p: (item_key(p), str(p)))


def item_key(path: Path) -> str:
    """Identity of an image across models: ``<parent>/<file>`` (e.g. ``<prompt-slug>/0003.png``)."""
    return f"{path.parent.name}/{path.name}"


class ImagePathsDataset(Dataset):
    """Images as uint8 (3, H, W) tensors, the input torch-fidelity extractors expect.

    Grey images are repeated to 3 channels. ``size`` resizes to size x size (bicubic); without
    it every image must have the same size (they are batched)."""

    def __init__(self, paths: Sequence[Path], size: int | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.size = size
        if size is None and self.paths:
            sizes = {}
            for p in self.paths:
                try:
                    with Image.open(p) as im:
                        sizes.setdefault(im.size, p)
                except (UnidentifiedImageError, OSError) as e:
                    raise DataError(f"{p}: unreadable image ({e}); expected PNG or JPEG") from None
            if len(sizes) > 1:
                raise DataError(f"images have different sizes {dict((str(k), str(v)) for k, v in sizes.items())}; "
                                "expected one size or an explicit image_size to resize to")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        p = self.paths[i]
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if self.size is not None and im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{p}: unreadable image ({e}); expected PNG or JPEG") from None
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------- extractors


@dataclass(frozen=True, eq=False)
class ModuleExtractorSpec:
    """How to get FID features from a pipeline network.

    ``features(net, x)`` maps the preprocessed float batch (B, in_channels, S, S) to (B, D)
    (a 4-D output is global-average-pooled); default ``net(x)``. ``net`` is the extractor's
    private copy of ``module`` (on the extraction device), e.g.
    ``features=lambda net, x: net.backbone(x)`` for penultimate features. Preprocessing of the uint8
    RGB batch: /255 -> resize to ``input_size`` (bilinear, antialiased) -> channel mean if
    ``in_channels == 1`` -> ``(x - mean) / std`` (per channel, or one value for all)."""

    module: nn.Module
    name: str
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    input_size: int | None = None
    in_channels: int = 3
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def identity(self) -> str:
        """Content hash of the weights and the preprocessing (cache key, registry name)."""
        h = hashlib.sha256()
        feat = self.features
        code = getattr(getattr(feat, "__code__", None), "co_code", b"") if feat is not None else b""
        h.update(repr((self.name, self.input_size, self.in_channels, tuple(self.mean), tuple(self.std),
                       getattr(feat, "__qualname__", None))).encode() + code)
        for k, v in sorted(self.module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if v.numel() else b"")
        return h.hexdigest()


def _module_extractor_class(spec: ModuleExtractorSpec) -> type:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ModuleFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity wrapper around one pipeline network (see ModuleExtractorSpec)."""

        _spec = spec

        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            super().__init__(name, features_list)
            import copy

            # A private copy: torch-fidelity flips requires_grad/eval/device on the extractor.
            self.net = copy.deepcopy(self._spec.module)
            c = self._spec.in_channels
            self.register_buffer("mean", _chan(self._spec.mean, c), persistent=False)
            self.register_buffer("std", _chan(self._spec.std, c), persistent=False)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "features"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            s = self._spec
            x = x.float() / 255.0
            if s.input_size is not None and tuple(x.shape[-2:]) != (s.input_size, s.input_size):
                x = F.interpolate(x, size=(s.input_size, s.input_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            if s.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            x = (x - self.mean) / self.std
            f = s.features(self.net, x) if s.features is not None else self.net(x)
            if f.ndim == 4:
                f = f.mean(dim=(2, 3))
            return (f.flatten(1).float(),)

    return ModuleFeatureExtractor


def _chan(v: Sequence[float], c: int) -> torch.Tensor:
    t = torch.tensor([float(x) for x in v], dtype=torch.float32)
    if t.numel() not in (1, c):
        raise DataError(f"normalisation has {t.numel()} values; expected 1 or {c} (in_channels)")
    return t.expand(c).reshape(1, c, 1, 1).clone()


@contextlib.contextmanager
def _force_weights_only() -> Iterator[None]:
    """torch-fidelity calls torch.load(weights_only=False); torch honours this override."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _register_local_inception() -> None:
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if _LOCAL_INCEPTION in FEATURE_EXTRACTORS_REGISTRY:
        return

    class LocalInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's inception-v3-compat that refuses to download its weights."""

        def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                     **kwargs: Any) -> None:
            if not feature_extractor_weights_path or not Path(feature_extractor_weights_path).is_file():
                raise DataError(f"{feature_extractor_weights_path}: Inception weights file not found; expected a local "
                                "pt_inception-2015-12-05 state dict (params: metrics.inception_weights)")
            with _force_weights_only():
                super().__init__(name, features_list,
                                 feature_extractor_weights_path=str(feature_extractor_weights_path), **kwargs)

    register_feature_extractor(_LOCAL_INCEPTION, LocalInceptionV3)


def resolve_extractor(extractor: str | nn.Module | ModuleExtractorSpec, *, weights_path: str | Path | None,
                      feature_layer: str | None) -> tuple[str, str, str, str]:
    """Register the extractor with torch-fidelity -> (registry name, layer, description, identity)."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if isinstance(extractor, str):
        if extractor not in (INCEPTION, _LOCAL_INCEPTION):
            raise DataError(f"feature extractor {extractor!r} unknown; expected '{INCEPTION}' (local weights) or an "
                            "nn.Module / ModuleExtractorSpec")
        if weights_path is None or not Path(weights_path).is_file():
            raise DataError(f"{weights_path}: Inception weights file not found; expected a local file "
                            "(params: metrics.inception_weights) — weights are never downloaded")
        _register_local_inception()
        layer = feature_layer or "2048"
        ident = hashlib.sha256(f"{INCEPTION}:{layer}:{hash_file(weights_path)}".encode()).hexdigest()
        return _LOCAL_INCEPTION, layer, f"{INCEPTION} ({layer}-d, weights {Path(weights_path).name})", ident
    if feature_layer not in (None, "features"):
        raise DataError(f"feature_layer {feature_layer!r}: a module extractor provides only 'features'")
    hit = _REGISTERED.get(id(extractor))
    if hit is not None and hit[0] is extractor:
        spec, name = hit[1], hit[2]
    else:
        spec = extractor if isinstance(extractor, ModuleExtractorSpec) else ModuleExtractorSpec(
            module=extractor, name=type(extractor).__name__)
        # One registry entry per spec/module object (the class holds it); the content hash
        # below, not the name, keys the feature cache, so later weight changes are seen.
        name = f"medrl-module-{len(FEATURE_EXTRACTORS_REGISTRY)}-{uuid.uuid4().hex[:8]}"
        register_feature_extractor(name, _module_extractor_class(spec))
        _REGISTERED[id(extractor)] = (extractor, spec, name)
    return name, "features", spec.name, spec.identity()


# ----------------------------------------------------------------------------- features


def extract_features(
    paths: Sequence[Path],
    extractor: str | nn.Module | ModuleExtractorSpec,
    *,
    weights_path: str | Path | None = None,
    feature_layer: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> tuple[np.ndarray, str]:
    """(N, D) float32 features of ``paths`` (in the given order) and the extractor description."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    name, layer, desc, ident = resolve_extractor(extractor, weights_path=weights_path, feature_layer=feature_layer)
    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha256(f"{ident}:{layer}:{image_size}".encode())
        for p in paths:
            h.update(hash_file(p).encode())
        cache_file = Path(cache_dir) / f"features-{h.hexdigest()[:32]}.safetensors"
        if cache_file.is_file():
            from safetensors.numpy import load_file

            return load_file(str(cache_file))["features"], desc
    cuda = str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise DataError(f"device {device!r}: CUDA is not available")
    fe = create_feature_extractor(name, [layer], cuda=cuda, verbose=False,
                                  feature_extractor_weights_path=str(weights_path) if weights_path else None)
    ds = ImagePathsDataset(paths, size=image_size)
    # save_cpu_ram=True -> no DataLoader worker processes (CPU runs share few cores).
    feats = get_featuresdict_from_dataset(ds, fe, batch_size, cuda, not cuda, verbose)[layer]
    out = feats.detach().cpu().numpy().astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise DataError(f"feature extractor {desc}: non-finite features; check the network and its inputs")
    if cache_file is not None:
        from safetensors.numpy import save_file

        with atomic_path(cache_file) as tmp:
            save_file({"features": out}, str(tmp))
    return out, desc


# ----------------------------------------------------------------------------- FID / KID maths


def standardize_features(f_real: np.ndarray, f_fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets z-scored per dimension by the real set's mean and s.d. (constant dimensions dropped)."""
    mu, sd = f_real.mean(0), f_real.std(0)
    keep = sd > 1e-6 * max(float(sd.max()), 1e-12)
    z = lambda f: ((f[:, keep] - mu[keep]) / sd[keep]).astype(np.float32)  # noqa: E731
    return z(f_real), z(f_fake)


def fid_from_features(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    """torch-fidelity's FID from two feature matrices."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    s1 = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(f_real)))
    s2 = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(f_fake)))
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def kid_from_features(f_real: np.ndarray, f_fake: np.ndarray, *, subset_size: int, subsets: int = 100,
                      seed: int = 0) -> tuple[float, float, int]:
    """torch-fidelity's KID (mean, std over subsets); subset size capped at the smaller set."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = int(min(subset_size, len(f_real), len(f_fake)))
    m = kid_features_to_metric(torch.from_numpy(f_real), torch.from_numpy(f_fake), kid_subsets=subsets,
                               kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(m[KEY_METRIC_KID_MEAN]), float(m[KEY_METRIC_KID_STD]), size


def fid_replicates(f_real: np.ndarray, f_fake: np.ndarray, c_real: np.ndarray, c_fake: np.ndarray) -> np.ndarray:
    """Exact FID of resampled sets given (B, n) multiplicity counts; see module docstring."""
    from threadpoolctl import threadpool_limits

    a = f_fake.astype(np.float64)
    b = f_real.astype(np.float64)
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise DataError(f"FID needs at least 2 images per set; got n_real={m}, n_fake={n}")
    gram = a @ b.T
    sq_a, sq_b = (a * a).sum(1), (b * b).sum(1)
    reps = np.empty(len(c_fake), dtype=np.float64)
    # BLAS thread pools oversubscribe shared CPUs badly here; follow torch's thread setting.
    with threadpool_limits(limits=max(1, torch.get_num_threads()), user_api="blas"):
        for r, (wa, wb) in enumerate(progress(zip(c_fake, c_real), desc="FID bootstrap", total=len(c_fake))):
            mu_a, mu_b = wa @ a / n, wb @ b / m
            tr_a = (wa @ sq_a - n * mu_a @ mu_a) / (n - 1)
            tr_b = (wb @ sq_b - m * mu_b @ mu_b) / (m - 1)
            ia, ib = wa > 0, wb > 0
            cross = gram[np.ix_(ia, ib)] - (a[ia] @ mu_b)[:, None] - (b[ib] @ mu_a)[None, :] + mu_a @ mu_b
            cross *= np.sqrt(wa[ia] / (n - 1))[:, None] * np.sqrt(wb[ib] / (m - 1))[None, :]
            nuc = np.linalg.svd(cross, compute_uv=False).sum()
            d = mu_a - mu_b
            reps[r] = d @ d + tr_a + tr_b - 2.0 * nuc
    return reps


def kid_replicates(f_real: np.ndarray, f_fake: np.ndarray, c_real: np.ndarray, c_fake: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 (torch-fidelity polynomial kernel) of resampled sets from (B, n) counts.

    Pairs of copies of the same item are left out of the within-set sums (they would add the
    kernel diagonal and bias the estimate); with all counts 1 this is the usual U-statistic."""
    from threadpoolctl import threadpool_limits
    from torch_fidelity.metric_kid import kernel_poly

    a, b = f_fake.astype(np.float64), f_real.astype(np.float64)
    with threadpool_limits(limits=max(1, torch.get_num_threads()), user_api="blas"):
        k_aa, k_bb, k_ab = kernel_poly(a, a), kernel_poly(b, b), kernel_poly(a, b)

        def within(c: np.ndarray, k: np.ndarray) -> np.ndarray:
            total = ((c @ k) * c).sum(1) - (c * c) @ np.diag(k)
            pairs = c.sum(1) ** 2 - (c * c).sum(1)
            return total / pairs

        cross = ((c_fake @ k_ab) * c_real).sum(1) / (c_fake.sum(1) * c_real.sum(1))
        return within(c_fake, k_aa) + within(c_real, k_bb) - 2.0 * cross


# ----------------------------------------------------------------------------- public API


def fid_kid(
    real: str | Path | Sequence[str | Path],
    fake: str | Path | Sequence[str | Path],
    *,
    extractor: str | nn.Module | ModuleExtractorSpec,
    weights_path: str | Path | None = None,
    feature_layer: str | None = None,
    kid_subset_size: int = 50,
    kid_subsets: int = 100,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    batch_size: int = 64,
    image_size: int | None = None,
    verbose: bool = True,
    fake_clusters: Mapping[str, Any] | None = None,
    standardize: bool = False,
) -> dict[str, Any]:
    """FID and KID between real and generated images, with bootstrap CIs.

    ``real``/``fake``: folders (searched recursively) or lists of PNG/JPG paths. ``extractor``:
    ``"inception-v3-compat"`` (needs ``weights_path``), an ``nn.Module`` (forward = features)
    or a ``ModuleExtractorSpec``. Returns ``fid, kid_mean, kid_std, n_real, n_fake`` (floats /
    ints, torch-fidelity's numbers), ``fid_metric`` / ``kid_metric`` (Metric dicts with paired
    replicates, see module docstring), ``feature_extractor`` (description), ``feature_dim``,
    ``kid_subset_size`` (as used). ``fake_clusters`` ({item_key(path): cluster id}, e.g. the
    report each generated image comes from) resamples the generated images by cluster.
    ``standardize``: z-score every feature dimension by the real set's mean and s.d. first, so
    that no single dimension of a task network's features dominates the distances."""
    real_paths, fake_paths = list_images(real), list_images(fake)
    if len(real_paths) < 2 or len(fake_paths) < 2:
        raise DataError(f"FID/KID need at least 2 images per set; got {len(real_paths)} real ({real!s:.200}), "
                        f"{len(fake_paths)} generated ({fake!s:.200})")
    kw = dict(weights_path=weights_path, feature_layer=feature_layer, device=device, batch_size=batch_size,
              image_size=image_size, cache_dir=cache_dir, verbose=verbose)
    f_real, desc = extract_features(real_paths, extractor, **kw)
    f_fake, _ = extract_features(fake_paths, extractor, **kw)
    n_real, n_fake = len(f_real), len(f_fake)
    if standardize:
        f_real, f_fake = standardize_features(f_real, f_fake)
        desc += ", each dimension z-scored by the real set"

    fid = fid_from_features(f_real, f_fake)
    kid_mean, kid_std, used_size = kid_from_features(f_real, f_fake, subset_size=kid_subset_size,
                                                     subsets=kid_subsets, seed=seed)
    # Different seeds for the two index matrices, both pure functions of (seed, n).
    c_real = boot_counts(n_real, n_boot=n_boot, seed=seed)
    clusters = None
    if fake_clusters is not None:
        missing = [str(p) for p in fake_paths if item_key(p) not in fake_clusters][:3]
        if missing:
            raise DataError(f"FID/KID: no cluster id for generated images {missing}")
        clusters = [fake_clusters[item_key(p)] for p in fake_paths]
    c_fake = boot_counts(n_fake, n_boot=n_boot, seed=seed + 1, clusters=clusters)
    key = boot_key(seed, [n_real, n_fake], n_boot,
                   [item_key(p) for p in real_paths] + ["|"] + [item_key(p) for p in fake_paths], clusters)
    fid_metric = metric_from_reps(fid, fid_replicates(f_real, f_fake, c_real, c_fake), n=n_fake, ci=ci,
                                  method="basic", keep_boot=True, key=key)
    if np.isfinite(fid_metric["lo"]):
        fid_metric["lo"] = max(0.0, fid_metric["lo"])  # FID >= 0
    kid_metric = metric_from_reps(kid_mean, kid_replicates(f_real, f_fake, c_real, c_fake), n=n_fake, ci=ci,
                                  method="percentile", keep_boot=True, key=key)
    return {
        "fid": fid, "kid_mean": kid_mean, "kid_std": kid_std, "n_real": n_real, "n_fake": n_fake,
        "fid_metric": fid_metric, "kid_metric": kid_metric, "feature_extractor": desc,
        "feature_dim": int(f_real.shape[1]), "kid_subset_size": used_size,
    }
