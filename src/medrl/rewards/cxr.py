"""CXRL rewards (paper Sec. 2.3-2.4): posture alignment, diagnostic condition, multimodal
consistency, their weighted sum, and RLCF (comparison with the frozen anchor model).

Per generated image x for report y:

* ``r_align = align_reward(aligner(x))`` (``medrl.rewards.align``); never comparative.
* ``diag(x, y)`` = accuracy of the diagnostic model's thresholded (p >= 0.5) predictions
  against the report's labels over the 11 classes (``label_accuracy``: stated positive and
  negative classes count, an uncertain one is left out, and a class the report does not
  mention is left out too with ``diag_unmentioned="ignore"`` or counts as negative with
  ``"negative"``, which a policy exploits by erasing findings).
* ``consist(x, y)`` = cosine(embed_image(x), embed_text(y)) of the dual encoder.

Without RLCF ``r_diag = diag(x, y)`` and ``r_consist = consist(x, y)``. With RLCF they are
differences to the anchor (frozen base) model's image(s) for the same report:

* ``rlcf_mode="paired"``: the trainer passes ``anchor_images`` sampled for the same report
  from the same x_T (paper Eq. 2's x-hat), with their own per-step noise unless
  ``rl.cxr.rlcf_paired_noise: shared`` (``medrl.diffusion.sampler.paired_anchor_noise`` is that rule);
  ``r = score(x) - score(x_hat)``. Sharing the step noise too lowers the reward variance
  further, but score(x_hat) then depends on the sample's own noise and the policy gradient is
  biased (measured: the full policy degrades; docs/NOTEBOOK.md, CXR-03).
* ``rlcf_mode="bank"``: ``r = score(x) - mean_k score(x_hat_k)`` with the mean over K
  anchor samples per report precomputed by ``build_anchor_bank`` (no anchor sampling during
  RL; same expectation, lower variance in the baseline, none of the shared-noise
  correlation).

``r = l_align * r_align + l_diag * r_diag + l_consist * r_consist``. When RLCF is on but a
term's weight is 0 and no anchor is available (``needs_anchor`` is False in paired mode),
that term is reported raw (it does not enter the reward).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medrl.errors import DataError
from medrl.io import hash_path, read_json, write_json, write_table
from medrl.progress import progress

__all__ = [
    "CXRReward",
    "ReportScorer",
    "anchor_sample_seed",
    "build_anchor_bank",
    "load_anchor_bank",
    "report_hash",
    "sample_images",
    "score_anchor_images",
]

LabelFn = Callable[[str], dict[str, float]]
BANK_COLUMNS = ["report_hash", "k", "diag_mean", "diag_std", "consist_mean", "consist_std",
                "diag_model_sha", "dualenc_model_sha", "diag_unmentioned", "report"]


def report_hash(report: str) -> str:
    """Stable key of a report in the anchor bank (sha256 of its UTF-8 text, 16 hex)."""
    return hashlib.sha256(report.encode("utf-8")).hexdigest()[:16]


def _model_sha(path: str | Path) -> str:
    """Identity of a reward model: its weights and config only (its eval.json holds wall times)."""
    path = Path(path)
    if path.is_file():
        return hash_path(path)[:16]
    parts = sorted(f for f in path.rglob("*") if f.suffix == ".safetensors" or f.name == "config.json")
    return hashlib.sha256("".join(f"{f.relative_to(path)}:{hash_path(f)}\n" for f in parts).encode()).hexdigest()[:16]


def _default_labels() -> LabelFn:
    from medrl.data.reports import label_report

    return label_report


# ----------------------------------------------------------------------------- scoring


class ReportScorer:
    """The two comparable scores (diag accuracy, dual-encoder cosine) of images vs reports.

    Text embeddings and report labels are cached per report string: RL revisits the same
    reports every epoch."""

    def __init__(self, diag: Any, dualenc: Any, *, labels_for: LabelFn | None = None, device: str | torch.device = "cpu",
                 diag_unmentioned: str = "ignore") -> None:
        from medrl.data.reports import PATHOLOGIES
        from medrl.models.dual_encoder import load_dual_encoder
        from medrl.models.xrv_diag import UNMENTIONED, load_diag

        self.device = torch.device(device)
        self.diag = load_diag(diag, device=str(self.device)) if isinstance(diag, (str, Path)) else diag.to(self.device).eval()
        self.dualenc = load_dual_encoder(dualenc, device=str(self.device)) if isinstance(dualenc, (str, Path)) else dualenc.to(self.device).eval()
        self.classes = list(PATHOLOGIES)
        self.labels_for = labels_for or _default_labels()
        if diag_unmentioned not in UNMENTIONED:
            raise DataError(f"diag_unmentioned={diag_unmentioned!r}; expected one of {UNMENTIONED}")
        self.diag_unmentioned = diag_unmentioned
        self._labels: dict[str, np.ndarray] = {}
        self._text: dict[str, torch.Tensor] = {}

    def labels(self, reports: Sequence[str]) -> np.ndarray:
        """(B, 11) CheXpert values (1/0/-1/NaN) for the reports."""
        rows = []
        for r in reports:
            if r not in self._labels:
                lab = self.labels_for(r)
                missing = [c for c in self.classes if c not in lab]
                if missing:
                    raise DataError(f"labels_for({r[:60]!r}): no value for {missing}; expected all of {self.classes}")
                self._labels[r] = np.array([np.nan if lab[c] is None else float(lab[c]) for c in self.classes], np.float32)
            rows.append(self._labels[r])
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), np.float32)

    def text_embeddings(self, reports: Sequence[str]) -> torch.Tensor:
        from medrl.models.dual_encoder import embed_texts

        new = [r for r in dict.fromkeys(reports) if r not in self._text]
        if new:
            for r, e in zip(new, embed_texts(self.dualenc, new)):
                self._text[r] = e
        return torch.stack([self._text[r] for r in reports])

    @torch.no_grad()
    def diag_scores(self, images: torch.Tensor, reports: Sequence[str]) -> torch.Tensor:
        from medrl.models.xrv_diag import label_accuracy, predict_probs

        return label_accuracy(predict_probs(self.diag, images), self.labels(reports), unmentioned=self.diag_unmentioned)

    @torch.no_grad()
    def consist_scores(self, images: torch.Tensor, reports: Sequence[str]) -> torch.Tensor:
        from medrl.models.dual_encoder import embed_images

        return (embed_images(self.dualenc, images) * self.text_embeddings(reports)).sum(-1)

    def score(self, images: torch.Tensor, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag accuracy (B,), consistency cosine (B,)) on CPU."""
        if images.ndim != 4 or images.shape[0] != len(reports):
            raise ValueError(f"images: expected (B, C, H, W) with B == len(reports) == {len(reports)}, got {tuple(images.shape)}")
        x = images.detach().float().clamp(0, 1)
        return self.diag_scores(x, reports), self.consist_scores(x, reports)


def score_anchor_images(
    images: torch.Tensor,
    reports: Sequence[str],
    *,
    diag: Any,
    dualenc: Any,
    labels_for: LabelFn | None = None,
    device: str = "cpu",
    diag_unmentioned: str = "ignore",
) -> dict[str, torch.Tensor]:
    """{"diag": (N,), "consist": (N,)} for anchor images vs their reports (``diag`` and
    ``dualenc``: model directories or loaded models, or pass a ``ReportScorer`` as diag)."""
    scorer = diag if isinstance(diag, ReportScorer) else ReportScorer(diag, dualenc, labels_for=labels_for, device=device,
                                                                      diag_unmentioned=diag_unmentioned)
    d, c = scorer.score(images, list(reports))
    return {"diag": d, "consist": c}


# ----------------------------------------------------------------------------- anchor bank


def load_anchor_bank(path: str | Path) -> pd.DataFrame:
    """The bank table (``BANK_COLUMNS``) from the CSV or JSON written by ``build_anchor_bank``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: anchor bank not found; expected the output of build_anchor_bank (.csv or .json)")
    if path.suffix == ".json":
        obj = read_json(path)
        if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
            raise DataError(f"{path}: expected a JSON object with a 'rows' list")
        df = pd.DataFrame(obj["rows"])
    else:
        try:
            df = pd.read_csv(path, dtype={"report_hash": str, "diag_model_sha": str, "dualenc_model_sha": str,
                                          "diag_unmentioned": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise DataError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in ("report_hash", "diag_mean", "consist_mean") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; expected {BANK_COLUMNS}")
    if df["report_hash"].duplicated().any():
        raise DataError(f"{path}: duplicate report_hash rows; expected one row per report")
    return df


def anchor_sample_seed(seed: int, report: str, j: int) -> int:
    """Seed of the j-th anchor sample of a report: depends on (seed, report, j) only, so a
    report's anchors do not change with the report list, its order or the batch size."""
    from medrl.diffusion.sampler import text_seed

    return text_seed(seed, report, j)


@torch.no_grad()
def sample_images(
    components: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    unet: Any = None,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from a diffusers SD stack with DDIM + CFG, one
    generator per sample (its seed) for both x_T and the per-step noise, so an image does not
    depend on the batch it is drawn in. ``unet`` replaces the stack's (a policy)."""
    from medrl.diffusion.stack import encode_prompts
    from medrl.diffusion.sampler import Noise, Sampler

    c = components
    text = encode_prompts(c, list(prompts)).float()
    sampler = Sampler(c.unet, c.vae, c.scheduler, encode_prompts(c, [""]).float(), num_steps=num_steps,
                      guidance_scale=guidance_scale, eta=eta)
    return sampler.sample(text, Noise(seeds), unet=unet).images.float().cpu()


def build_anchor_bank(
    base_dir: str | Path,
    reports: Sequence[str],
    out_path: str | Path,
    *,
    k: int,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    diag_dir: str | Path,
    dualenc_dir: str | Path,
    labels_for: LabelFn | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    unet_weights: str | None = None,
    diag_unmentioned: str = "ignore",
) -> dict[str, float]:
    """Sample K images per (unique) report with the frozen base model (``load_components``),
    score them (``ReportScorer``) and write the per-report mean/std table atomically to
    ``out_path`` (.json: {"meta", "rows"}; otherwise CSV with ``BANK_COLUMNS``). Sample
    (report, j) uses ``anchor_sample_seed(seed, report, j)``."""
    from medrl.diffusion.stack import load_components

    if k < 1:
        raise DataError(f"k={k}: expected at least one anchor sample per report")
    uniq = [r for r in dict.fromkeys(reports) if isinstance(r, str)]
    if not uniq:
        raise DataError("build_anchor_bank: no reports given")
    c = load_components(str(base_dir), unet_weights=unet_weights, device=device)
    scorer = ReportScorer(diag_dir, dualenc_dir, labels_for=labels_for, device=device, diag_unmentioned=diag_unmentioned)
    jobs = [(r, j) for r in uniq for j in range(k)]
    diag: dict[str, list[float]] = {r: [] for r in uniq}
    cons: dict[str, list[float]] = {r: [] for r in uniq}
    for i in progress(range(0, len(jobs), batch_size), desc="anchor bank", total=math.ceil(len(jobs) / batch_size)):
        chunk = jobs[i : i + batch_size]
        prompts = [r for r, _ in chunk]
        images = sample_images(c, prompts, [anchor_sample_seed(seed, r, j) for r, j in chunk],
                               num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)
        d, s = scorer.score(images, prompts)
        for (r, _), dv, sv in zip(chunk, d.tolist(), s.tolist()):
            diag[r].append(dv)
            cons[r].append(sv)
    dsha, esha = _model_sha(diag_dir), _model_sha(dualenc_dir)
    rows = [{
        "report_hash": report_hash(r), "k": k,
        "diag_mean": float(np.mean(diag[r])), "diag_std": float(np.std(diag[r])),
        "consist_mean": float(np.mean(cons[r])), "consist_std": float(np.std(cons[r])),
        "diag_model_sha": dsha, "dualenc_model_sha": esha, "diag_unmentioned": diag_unmentioned, "report": r,
    } for r in uniq]
    hashes = [row["report_hash"] for row in rows]
    if len(set(hashes)) != len(hashes):
        raise DataError("build_anchor_bank: two different reports share a 16-hex report_hash")
    out_path = Path(out_path)
    if out_path.suffix == ".json":
        write_json(out_path, {"meta": {"k": k, "seed": seed, "num_steps": num_steps, "guidance_scale": guidance_scale,
                                       "eta": eta, "base": str(base_dir)}, "rows": rows})
    else:
        write_table(pd.DataFrame(rows, columns=BANK_COLUMNS), out_path)
    all_d = np.concatenate([diag[r] for r in uniq])
    all_c = np.concatenate([cons[r] for r in uniq])
    return {
        "n_reports": float(len(uniq)), "k": float(k), "n_images": float(len(jobs)),
        "diag_mean": float(all_d.mean()), "consist_mean": float(all_c.mean()),
        "diag_within_report_std": float(np.mean([np.std(diag[r]) for r in uniq])),
        "consist_within_report_std": float(np.mean([np.std(cons[r]) for r in uniq])),
    }


# ----------------------------------------------------------------------------- the reward


class CXRReward:
    """CXRL reward callable: ``reward(images (B,3,H,W) [0,1], prompts, anchor_images=None)
    -> (r (B,), terms)`` with terms r_align, r_diag, r_consist (as used), raw_diag,
    raw_consist (the policy image's own scores) and, with RLCF, anchor_diag, anchor_consist."""

    def __init__(
        self,
        aligner_dir: str | Path,
        diag_dir: str | Path,
        dualenc_dir: str | Path,
        *,
        l_align: float = 1.0,
        l_diag: float = 10.0,
        l_consist: float = 10.0,
        rlcf: bool = True,
        rlcf_mode: str = "bank",
        labels_for: LabelFn | None = None,
        anchor_bank: str | Path | None = None,
        device: str | torch.device = "cpu",
        diag_unmentioned: str = "ignore",
    ) -> None:
        from medrl.models.posture import load_aligner

        if rlcf_mode not in ("paired", "bank"):
            raise DataError(f"rlcf_mode={rlcf_mode!r}: expected 'paired' or 'bank'")
        self.l_align, self.l_diag, self.l_consist = float(l_align), float(l_diag), float(l_consist)
        self.rlcf, self.rlcf_mode = bool(rlcf), rlcf_mode
        self.device = torch.device(device)
        self.aligner = load_aligner(aligner_dir, device=str(self.device))
        self.scorer = ReportScorer(diag_dir, dualenc_dir, labels_for=labels_for, device=self.device,
                                   diag_unmentioned=diag_unmentioned)
        self.bank: dict[str, tuple[float, float]] | None = None
        self.bank_path = Path(anchor_bank) if anchor_bank is not None else None
        comparative = self.l_diag != 0 or self.l_consist != 0
        # A given bank is loaded even without RLCF: its anchor scores are then logged as a reference
        # (not subtracted), so every ablation reports the same terms and lines up in MLflow's compare view.
        if rlcf_mode == "bank" and ((self.rlcf and comparative) or anchor_bank is not None):
            if anchor_bank is None:
                raise DataError("CXRReward: rlcf_mode='bank' needs anchor_bank (the output of build_anchor_bank)")
            df = load_anchor_bank(anchor_bank)
            for col, d in (("diag_model_sha", diag_dir), ("dualenc_model_sha", dualenc_dir)):
                if col in df.columns and df[col].notna().any() and set(df[col].dropna().astype(str)) != {_model_sha(d)}:
                    raise DataError(f"{anchor_bank}: scored with a different model than {d} ({col}); rebuild the bank")
            # Older banks lack the column; a bank with another diag reading would bias r_diag by a constant per report.
            col = "diag_unmentioned"
            if col in df.columns and df[col].notna().any() and set(df[col].dropna()) != {diag_unmentioned}:
                raise DataError(f"{anchor_bank}: diag scored with {col}={sorted(set(df[col].dropna()))}, the reward "
                                f"uses {diag_unmentioned!r}; rebuild the bank")
            self.bank = {str(h): (float(a), float(b)) for h, a, b in zip(df["report_hash"], df["diag_mean"], df["consist_mean"])}

    @property
    def needs_anchor(self) -> bool:
        """True when the trainer must sample anchor images (paired RLCF with a comparative term)."""
        return self.rlcf and self.rlcf_mode == "paired" and (self.l_diag != 0 or self.l_consist != 0)

    def _bank_scores(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.bank is not None
        out = []
        for p in prompts:
            hit = self.bank.get(report_hash(p))
            if hit is None:
                raise DataError(f"{self.bank_path}: no anchor scores for report {p[:60]!r} (hash {report_hash(p)}); "
                                "build the bank over every report RL samples")
            out.append(hit)
        t = torch.tensor(out, dtype=torch.float32).view(len(prompts), 2)
        return t[:, 0], t[:, 1]

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], anchor_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from medrl.models.posture import predict_psi
        from medrl.rewards.align import align_reward

        prompts = list(prompts)
        if images.ndim != 4 or images.shape[0] != len(prompts):
            raise ValueError(f"images: expected (B, 3, H, W) with B == len(prompts) == {len(prompts)}, got {tuple(images.shape)}")
        x = images.detach().float().clamp(0, 1)
        psi = predict_psi(self.aligner, x.to(self.device)).cpu()
        r_align = align_reward(psi)
        raw_diag, raw_consist = self.scorer.score(x, prompts)
        terms: dict[str, torch.Tensor] = {"r_align": r_align, "raw_diag": raw_diag, "raw_consist": raw_consist}
        for j, n in enumerate(("sx", "sy", "tx", "ty", "theta")):
            terms[f"psi_{n}"] = psi[:, j]
        r_diag, r_consist = raw_diag, raw_consist
        anchor: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.rlcf_mode == "paired" and anchor_images is not None:
            if anchor_images.shape != images.shape:
                raise ValueError(f"anchor_images: shape {tuple(anchor_images.shape)} != images {tuple(images.shape)}")
            anchor = self.scorer.score(anchor_images.detach().float().clamp(0, 1), prompts)
        elif self.rlcf_mode == "bank" and self.bank is not None:
            anchor = self._bank_scores(prompts)
        elif self.needs_anchor:
            raise ValueError("CXRReward: paired RLCF needs anchor_images (same reports, same initial noise)")
        if anchor is not None:
            terms["anchor_diag"], terms["anchor_consist"] = anchor
            if self.rlcf:
                r_diag, r_consist = raw_diag - anchor[0], raw_consist - anchor[1]
        terms["r_diag"], terms["r_consist"] = r_diag, r_consist
        reward = self.l_align * r_align + self.l_diag * r_diag + self.l_consist * r_consist
        return reward, terms
