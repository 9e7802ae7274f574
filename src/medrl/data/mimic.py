"""MIMIC-CXR-JPG 2.1.0 real-data ingest: build the normalised CXR format.

Output (docs/ARCHITECTURE.md, "Normalised dataset formats"): ``out_dir/images/<dicom_id>.jpg``
(the original grayscale JPEG bytes, hard-linked or copied, each decoded once to prove it is
readable; readers accept .jpg and .png) and ``out_dir/metadata.csv`` with
``image,subject_id,study_id,view,split,report,`` + the 11 ``PATHOLOGIES`` + ``Support Devices``
+ ``sx,sy,tx,ty,theta`` (NaN: the true posture of a real radiograph is unknown). Labels are
CheXpert's (1, 0, -1, empty); CheXpert's "Pleural Effusion" is our "Effusion". ``split`` is
MIMIC's own (train / validate / test). Only frontal images (ViewPosition PA or AP) whose study
has a report are kept; with ``max_images`` the first N in sha256(dicom_id) order are taken, a
deterministic choice spread over all patients. The directory is built in a temp sibling and
renamed into place only on success.

Pointing the pipeline at real data (params.yaml)::

    cxr:
      source: real
      real:
        # EITHER a local copy (wins when set) ...
        root: /data/mimic-cxr-jpg/2.1.0
        # ... OR a PhysioNet download (credentialed account with MIMIC-CXR + MIMIC-CXR-JPG access)
        download: true
        base_url: https://physionet.org/files
        cache_dir: data/raw/mimic
        max_images: 6000          # null = every frontal image

    export PHYSIONET_USERNAME=...  PHYSIONET_PASSWORD=...   # download only; read from the
    # environment at run time, never stored in params, logs, errors, files or MLflow

Local layout (``root``): MIMIC-CXR-JPG 2.1.0 as published: ``mimic-cxr-2.0.0-metadata.csv.gz``,
``mimic-cxr-2.0.0-split.csv.gz``, ``mimic-cxr-2.0.0-chexpert.csv.gz`` (plain ``.csv`` also
accepted) and ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``. Reports come from MIMIC-CXR
(not -JPG) and are looked up per study, first hit wins:

1. ``root/mimic-cxr-reports/files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (the reports zip extracted
   inside root),
2. ``root/files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (reports beside the JPG study folders),
3. ``root/mimic-cxr-reports.zip`` (read without extracting).

A partial local copy is fine: frontal images whose JPG is absent are skipped (counted and
logged). Download mode fetches ``{base_url}/mimic-cxr-jpg/2.1.0/<csv>`` and
``{base_url}/mimic-cxr/2.0.0/mimic-cxr-reports.zip`` first, chooses the images, then fetches
only those JPGs (resumable, parallel, progress bar) into ``cache_dir``, mirroring the
PhysioNet paths. Every file is checked against the project's published ``SHA256SUMS.txt``;
a project without that file, or a file it does not list, fails the download (fail closed)
unless ``verify_checksums=False`` (``cxr.real.verify_checksums: false``), which fetches such
files unverified with a warning. Credentials are sent only over https:// (plain http:// only
to a loopback host, for tests).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import os
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pooch
import requests

from medrl.data.download import (
    RedactedBasicAuth,
    check_base_url,
    check_credentials_url,
    fetch,
    link_or_copy,
    parse_sha256sums,
    verify_image,
)
from medrl.data.reports import PATHOLOGIES
from medrl.errors import DataError
from medrl.io import atomic_dir, read_table, write_table
from medrl.progress import progress
from medrl.redact import redact_url

log = logging.getLogger(__name__)

ENV_USER = "PHYSIONET_USERNAME"
ENV_PASSWORD = "PHYSIONET_PASSWORD"
AUTH_HINT = (
    f"PhysioNet refused the credentials: set the environment variables {ENV_USER} and "
    f"{ENV_PASSWORD} to a credentialed PhysioNet account that has signed the MIMIC-CXR and "
    "MIMIC-CXR-JPG data use agreements"
)
JPG_PROJECT = "mimic-cxr-jpg/2.1.0"
REPORTS_PROJECT = "mimic-cxr/2.0.0"
REPORTS_ZIP = "mimic-cxr-reports.zip"
SUMS = "SHA256SUMS.txt"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
META_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
SPLIT_COLUMNS = ["dicom_id", "study_id", "subject_id", "split"]
CHEXPERT_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
]
RENAME = {"Pleural Effusion": "Effusion"}
FRONTAL = ("PA", "AP")
SPLITS = ("train", "validate", "test")
POSTURE = ["sx", "sy", "tx", "ty", "theta"]
OUT_COLUMNS = ["image", "subject_id", "study_id", "view", "split", "report", *PATHOLOGIES, "Support Devices", *POSTURE]


def acquire_mimic(
    out_dir: Path,
    *,
    root: str | None,
    download: bool,
    base_url: str,
    cache_dir: str,
    max_images: int | None = None,
    workers: int = 4,
    progressbar: bool = True,
    verify_checksums: bool = True,
) -> dict[str, float]:
    """Build ``out_dir`` (normalised CXR format) from a local MIMIC-CXR-JPG copy or PhysioNet.

    Returns counts: images kept, PA/AP, per split, frontal candidates, studies without a
    report, and (local mode) frontal images absent from the copy.
    """
    out_dir = Path(out_dir)
    if max_images is not None and max_images < 1:
        raise DataError(f"cxr.real.max_images: must be >= 1 or null, got {max_images}")
    with contextlib.ExitStack() as stack:
        if root is not None:
            if download:
                log.info("cxr.real.root is set: using the local copy, not downloading")
            src = Path(root)
            if not src.is_dir():
                raise DataError(f"{src}: MIMIC-CXR-JPG root not found; expected a folder with files/ and the *.csv.gz tables")
            table = _load_tables(src)
            reports = stack.enter_context(_ReportSource.local(src))
            table, n_no_report = _with_reports(table, reports)
            scan = progress(table["rel"], desc="mimic: scanning local copy", disable=not progressbar)
            have = np.fromiter(((src / r).is_file() for r in scan), dtype=bool, count=len(table))
            n_missing, n_candidates = int((~have).sum()), int(have.sum())
            if n_missing:
                log.warning("%s: %d frontal images are not in this copy; choosing among the %d present", src, n_missing, n_candidates)
            chosen = _choose(table[have], max_images)
            if chosen.empty:
                raise DataError(f"{src}: no frontal (PA/AP) image with a report is present; expected files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg")
        else:
            if not download:
                raise DataError(
                    "cxr.real: neither root (a local MIMIC-CXR-JPG copy) nor download: true is set; "
                    "expected one of them for cxr.source=real"
                )
            base = check_credentials_url(check_base_url(base_url, "cxr.real.base_url"), "cxr.real.base_url")
            dl = stack.enter_context(_Downloader(Path(cache_dir), base, _physionet_auth(), workers, progressbar,
                                                 verify_checksums=verify_checksums))
            src = dl.jpg_root
            table = _load_tables(dl.tables())
            reports = stack.enter_context(_ReportSource(zip_path=dl.reports_zip()))
            table, n_no_report = _with_reports(table, reports)
            n_missing, n_candidates = 0, len(table)
            chosen = _choose(table, max_images)
            if chosen.empty:
                raise DataError(f"{dl.jpg_root}: no frontal (PA/AP) image with a report in the metadata")
            dl.images(chosen["rel"].tolist())

        with atomic_dir(out_dir) as tmp:
            images = tmp / "images"
            images.mkdir()
            texts = []
            for row in progress(chosen.itertuples(index=False), total=len(chosen), desc="mimic images", disable=not progressbar):
                jpg = src / row.rel
                verify_image(jpg, jpg)
                link_or_copy(jpg, images / f"{row.dicom_id}.jpg")
                texts.append(reports.read(row.subject_id, row.study_id))
            meta = _output_table(chosen, texts)
            write_table(meta, tmp / "metadata.csv")

    counts = {
        "n_images": float(len(meta)),
        "n_frontal_candidates": float(n_candidates),
        "n_studies_without_report": float(n_no_report),
        "n_missing_local": float(n_missing),
    }
    for v in FRONTAL:
        counts[f"n_{v}"] = float((meta["view"] == v).sum())
    for s in SPLITS:
        counts[f"n_{s}"] = float((meta["split"] == s).sum())
    return counts


# ----------------------------------------------------------------------------- tables


def _table_path(folder: Path, name: str) -> Path:
    p = folder / name
    if not p.is_file() and (folder / name.removesuffix(".gz")).is_file():
        p = folder / name.removesuffix(".gz")
    if not p.is_file():
        raise DataError(f"{p}: file not found; expected the MIMIC-CXR-JPG 2.1.0 table {name}")
    return p


def _load_tables(folder: Path) -> pd.DataFrame:
    """Frontal images joined with split and CheXpert labels; ``rel`` is the JPG path."""
    meta_p, split_p, chex_p = (_table_path(folder, n) for n in (METADATA_CSV, SPLIT_CSV, CHEXPERT_CSV))
    meta = read_table(meta_p, META_COLUMNS)
    split = read_table(split_p, SPLIT_COLUMNS)
    chex = read_table(chex_p, ["subject_id", "study_id", *CHEXPERT_LABELS])
    for df, p in ((meta, meta_p), (split, split_p), (chex, chex_p)):
        _int_ids(df, p)
    meta["dicom_id"] = meta["dicom_id"].astype(str)
    split["dicom_id"] = split["dicom_id"].astype(str)
    bad = sorted(set(split["split"].astype(str)) - set(SPLITS))
    if bad:
        raise DataError(f"{split_p}: column 'split' has {bad}; expected one of {list(SPLITS)}")
    for c in CHEXPERT_LABELS:
        v = pd.to_numeric(chex[c], errors="coerce")
        wrong = chex[c].notna() & ~v.isin([1, 0, -1])
        if wrong.any():
            raise DataError(f"{chex_p}: column {c!r} has {chex[c][wrong].iloc[0]!r}; expected 1, 0, -1 or empty")
        chex[c] = v
    if chex.duplicated(["subject_id", "study_id"]).any():
        raise DataError(f"{chex_p}: (subject_id, study_id) must be unique")

    frontal = meta[meta["ViewPosition"].isin(FRONTAL)].rename(columns={"ViewPosition": "view"})
    df = frontal.merge(split[["dicom_id", "split"]], on="dicom_id", how="left", validate="one_to_one")
    if df["split"].isna().any():
        raise DataError(f"{split_p}: no split for dicom_id {df.loc[df['split'].isna(), 'dicom_id'].iloc[0]}; expected every image of {meta_p}")
    df = df.merge(chex[["subject_id", "study_id", *CHEXPERT_LABELS]], on=["subject_id", "study_id"], how="left")
    df["rel"] = [_study_dir(s, t) + f"/{d}.jpg" for s, t, d in zip(df["subject_id"], df["study_id"], df["dicom_id"])]
    return df


def _int_ids(df: pd.DataFrame, path: Path) -> None:
    for c in ("subject_id", "study_id"):
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any() or (v != v.round()).any():
            raise DataError(f"{path}: column {c!r} must hold integer ids")
        df[c] = v.astype("int64")


def _study_dir(subject_id: int, study_id: int) -> str:
    s = str(int(subject_id))
    return f"files/p{s[:2]}/p{s}/s{int(study_id)}"


def _choose(df: pd.DataFrame, max_images: Optional[int]) -> pd.DataFrame:
    """Deterministic subset: order by sha256(dicom_id) (independent of CSV order, spread over
    patients), keep the first ``max_images``, then sort for a readable output."""
    key = df["dicom_id"].map(lambda d: hashlib.sha256(d.encode()).hexdigest())
    picked = df.assign(_k=key).sort_values("_k", kind="stable")
    if max_images is not None:
        picked = picked.head(max_images)
    return picked.drop(columns="_k").sort_values(["subject_id", "study_id", "dicom_id"]).reset_index(drop=True)


def _with_reports(df: pd.DataFrame, reports: "_ReportSource") -> tuple[pd.DataFrame, int]:
    has = np.array([reports.has(s, t) for s, t in zip(df["subject_id"], df["study_id"])], dtype=bool)
    studies_without = df.loc[~has, ["subject_id", "study_id"]].drop_duplicates()
    if len(studies_without):
        log.warning("%d studies with frontal images have no report (%s); their images are skipped", len(studies_without), reports)
    return df[has].reset_index(drop=True), len(studies_without)


def _output_table(chosen: pd.DataFrame, texts: list[str]) -> pd.DataFrame:
    out = pd.DataFrame({
        "image": chosen["dicom_id"],
        "subject_id": chosen["subject_id"],
        "study_id": chosen["study_id"],
        "view": chosen["view"],
        "split": chosen["split"],
        "report": texts,
    })
    for c in CHEXPERT_LABELS:
        name = RENAME.get(c, c)
        if name in PATHOLOGIES or name == "Support Devices":
            out[name] = chosen[c].astype("Int64")  # 1 / 0 / -1 / empty, written without ".0"
    for c in POSTURE:
        out[c] = np.nan
    return out[OUT_COLUMNS]


# ----------------------------------------------------------------------------- reports


class _ReportSource:
    """Report text per (subject, study) from folders and/or a reports zip."""

    def __init__(self, dirs: tuple[Path, ...] = (), zip_path: Optional[Path] = None) -> None:
        self.dirs = dirs
        self.zip_path = zip_path
        self._zip: Optional[zipfile.ZipFile] = None
        self._index: dict[str, str] = {}
        if zip_path is not None:
            try:
                self._zip = zipfile.ZipFile(zip_path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{zip_path}: not a readable zip archive ({e}); expected {REPORTS_ZIP}") from None
            for member in self._zip.namelist():  # key: the part from "files/" on
                i = member.rfind("files/")
                if i >= 0 and member.endswith(".txt"):
                    self._index.setdefault(member[i:], member)

    @classmethod
    def local(cls, root: Path) -> "_ReportSource":
        dirs = tuple(d for d in (root / "mimic-cxr-reports", root) if (d / "files").is_dir())
        z = root / REPORTS_ZIP
        src = cls(dirs, z if z.is_file() else None)
        if not dirs and src._zip is None:
            raise DataError(
                f"{root}: no reports found; expected mimic-cxr-reports/files/..., files/pXX/pXXXXXXXX/sXXXXXXXX.txt "
                f"or {REPORTS_ZIP} inside root"
            )
        return src

    def __repr__(self) -> str:
        where = [str(d) for d in self.dirs] + ([str(self.zip_path)] if self.zip_path else [])
        return f"reports from {', '.join(where)}"

    def __enter__(self) -> "_ReportSource":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _rel(self, subject_id: int, study_id: int) -> str:
        return _study_dir(subject_id, study_id) + ".txt"

    def has(self, subject_id: int, study_id: int) -> bool:
        rel = self._rel(subject_id, study_id)
        return any((d / rel).is_file() for d in self.dirs) or rel in self._index

    def read(self, subject_id: int, study_id: int) -> str:
        rel = self._rel(subject_id, study_id)
        for d in self.dirs:
            p = d / rel
            if p.is_file():
                return _decode(p.read_bytes(), p)
        member = self._index.get(rel)
        if member is None or self._zip is None:
            raise DataError(f"{rel}: report not found in {self}")
        try:
            data = self._zip.read(member)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise DataError(f"{self.zip_path}: member {member} is corrupt ({e})") from None
        return _decode(data, f"{self.zip_path}:{member}")


def _decode(data: bytes, name: object) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: report is not UTF-8 text ({e})") from None
    text = text.strip()
    if not text:
        raise DataError(f"{name}: report is empty; expected the radiology report text")
    return text


# ----------------------------------------------------------------------------- download


def _physionet_auth() -> RedactedBasicAuth:
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if not user or not password:
        raise DataError(
            f"cxr.real.download: PhysioNet credentials missing; set the environment variables "
            f"{ENV_USER} and {ENV_PASSWORD} (they are read only from the environment)"
        )
    return RedactedBasicAuth(user, password)


class _Downloader:
    """Fetches PhysioNet files into ``cache/<project>/<path>``, checking SHA256SUMS.txt."""

    def __init__(self, cache: Path, base: str, auth: RedactedBasicAuth, workers: int, progressbar: bool,
                 verify_checksums: bool = True) -> None:
        self.cache, self.base, self.auth = cache, base, auth
        self.verify_checksums = verify_checksums
        self.workers = max(1, int(workers))
        self.progressbar = progressbar
        self.jpg_root = cache / JPG_PROJECT
        self._sums: dict[str, dict[str, str]] = {}
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "_Downloader":
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self._sessions:
            s.close()

    def _session(self) -> requests.Session:  # one per thread: Session is not thread-safe
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(s)
        return s

    def _sums_for(self, project: str) -> dict[str, str]:
        if project not in self._sums:
            dest = self.cache / project / SUMS
            try:  # the checksum list itself has no published hash; TLS + auth protect it
                fetch(f"{self.base}/{project}/{SUMS}", dest, known_hash=None, auth=self.auth,
                      session=self._session(), progressbar=self.progressbar, auth_hint=AUTH_HINT)
                self._sums[project] = parse_sha256sums(dest)
            except DataError as e:
                if "HTTP 404" not in str(e):
                    raise
                if self.verify_checksums:
                    raise DataError(
                        f"{redact_url(self.base)}/{project}/{SUMS}: not found (HTTP 404), so the files of {project} "
                        f"cannot be checksum-verified; expected PhysioNet's published {SUMS} there (check "
                        "cxr.real.base_url), or set cxr.real.verify_checksums: false to download them unverified"
                    ) from None
                log.warning("%s/%s: no %s published; files of this project are not checksum-verified "
                            "(cxr.real.verify_checksums: false)", redact_url(self.base), project, SUMS)
                self._sums[project] = {}
        return self._sums[project]

    def _get(self, project: str, rel: str, progressbar: bool) -> Path:
        sha = self._sums_for(project).get(rel)
        if sha is None and self.verify_checksums:
            raise DataError(
                f"{project}/{rel}: not listed in {project}/{SUMS}, so it cannot be checksum-verified; "
                "set cxr.real.verify_checksums: false to download it unverified"
            )
        if sha is None and self._sums[project]:
            log.warning("%s/%s: not listed in %s; fetched unverified", project, rel, SUMS)
        return fetch(
            f"{self.base}/{project}/{rel}", self.cache / project / rel,
            known_hash=f"sha256:{sha}" if sha else None, auth=self.auth, session=self._session(),
            progressbar=progressbar, auth_hint=AUTH_HINT,
        )

    def tables(self) -> Path:
        for name in (METADATA_CSV, SPLIT_CSV, CHEXPERT_CSV):
            self._get(JPG_PROJECT, name, self.progressbar)
        return self.jpg_root

    def reports_zip(self) -> Path:
        return self._get(REPORTS_PROJECT, REPORTS_ZIP, self.progressbar)

    def images(self, rels: list[str]) -> None:
        self._sums_for(JPG_PROJECT)  # once, before the threads start
        bar = progress(total=len(rels), desc="mimic: downloading JPGs", disable=not self.progressbar, unit="img")
        plog = pooch.get_logger()
        level = plog.level
        plog.setLevel(max(level, logging.WARNING))  # no "Downloading ..." line per image
        try:
            with cf.ThreadPoolExecutor(self.workers) as pool:
                futures = [pool.submit(self._get, JPG_PROJECT, rel, False) for rel in rels]
                try:
                    for fut in cf.as_completed(futures):
                        fut.result()
                        bar.update(1)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            plog.setLevel(level)
            bar.close()
