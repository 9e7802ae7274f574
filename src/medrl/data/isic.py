"""ISIC 2019 real-data ingest: build the normalised ISIC format from the challenge files.

Output (docs/ARCHITECTURE.md, "Normalised dataset formats"): ``out_dir/images/<image>.jpg``
(the original JPEG bytes, hard-linked or copied, each one decoded once to prove it is
readable) and ``out_dir/labels.csv`` with exactly ``ISIC_COLUMNS`` as 0/1 ints. The
directory is built in a temp sibling and renamed into place only on success.

Pointing the pipeline at real data (params.yaml)::

    isic:
      source: real
      real:
        artifact_csv: /data/isic_bias.csv   # required: per-image artifact annotations
        # EITHER a local copy (wins when set) ...
        root: /data/isic2019                # see "Local layout" below
        # ... OR a download from the ISIC challenge bucket
        download: true
        base_url: https://isic-challenge-data.s3.amazonaws.com/2019
        cache_dir: data/raw/isic
        known_hashes:                       # required for download, see "Checksums"
          ISIC_2019_Training_Input.zip: "sha256:<64 hex>"
          ISIC_2019_Training_GroundTruth.csv: "sha256:<64 hex>"
          ISIC_2019_Training_Metadata.csv: "sha256:<64 hex>"

Local layout (``root``): a folder holding ``ISIC_2019_Training_GroundTruth.csv`` and either
the extracted ``ISIC_2019_Training_Input/ISIC_XXXXXXX.jpg`` (a doubly nested
``ISIC_2019_Training_Input/ISIC_2019_Training_Input/`` as on Kaggle is accepted) or the
unopened ``ISIC_2019_Training_Input.zip`` (images are read straight from the archive, never
extracted to disk; the folder wins when both exist). ``root`` may also be the zip itself, with the CSVs beside it.
``ISIC_2019_Training_Metadata.csv`` is optional locally; when present its columns are
checked. Local files are checked against a pinned hash when one is given.

Checksums: ``ISIC_2019_SHA256`` is the pinned registry. No sha256/md5 of these files is
published by the ISIC challenge and none could be verified from public sources, so every
entry is ``None``: a download then refuses to start until the user pins a hash
(``known_hashes`` argument / ``isic.real.known_hashes``) for each file, taken from a copy
they trust (``sha256sum``). Downloads are resumable (HTTP Range) and show a progress bar.

Artifact annotations: a user-supplied CSV with ``image`` and the artifact columns
``dark_corner, hair, gel_border, gel_bubble, ruler, ink, patches`` (all required) and
optionally ``vasc`` (filled with 0 when absent: Bissoto et al.'s public annotations have no
such column). Delimiter is sniffed (Bissoto et al.'s ``isic_bias.csv`` uses ``;`` with an
unnamed index column), image names may carry an extension (``ISIC_0000000.png``), extra
columns are ignored. ``MEL`` and ``NV`` come from the ground truth. Only images that have
artifact annotations *and* ground truth are kept; annotated images missing from the ground
truth are dropped and counted.
"""
from __future__ import annotations

import io
import logging
import re
import zipfile
import zlib
from pathlib import Path
from typing import Mapping, Optional

import pandas as pd

from medrl.data.download import (
    check_base_url,
    check_known_hash,
    fetch,
    link_or_copy,
    pinned,
    verify_file,
    verify_image,
)
from medrl.data.prompts import ISIC_COLUMNS
from medrl.errors import DataError
from medrl.io import atomic_dir, read_table, write_table
from medrl.progress import progress

log = logging.getLogger(__name__)

INPUT_ZIP = "ISIC_2019_Training_Input.zip"
INPUT_DIR = "ISIC_2019_Training_Input"
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
GT_COLUMNS = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
META_COLUMNS = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
ARTIFACTS = ["dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches"]
OPTIONAL_ARTIFACTS = {"vasc": 0}  # absent from Bissoto et al.'s annotations -> 0

# Pinned known hashes ("sha256:<hex>"). None = no verified published value exists; a
# download refuses to run until the caller pins one (see module docstring).
ISIC_2019_SHA256: dict[str, Optional[str]] = {
    INPUT_ZIP: None,
    GROUND_TRUTH: None,
    METADATA: None,
}
DOWNLOAD_ORDER = (GROUND_TRUTH, METADATA, INPUT_ZIP)  # small files first: fail fast


def acquire_isic(
    out_dir: Path,
    *,
    root: str | None,
    download: bool,
    base_url: str,
    artifact_csv: str | None,
    cache_dir: str,
    known_hashes: Optional[Mapping[str, Optional[str]]] = None,
    progressbar: bool = True,
) -> dict[str, float]:
    """Build ``out_dir`` (normalised ISIC format) from a local copy or a verified download.

    ``known_hashes`` overrides entries of ``ISIC_2019_SHA256`` (file name -> 'sha256:<hex>').
    Returns counts: images kept, MEL/NV positives, per-artifact positives, annotations read
    and annotations dropped for lack of ground truth.
    """
    out_dir = Path(out_dir)
    if artifact_csv is None:
        raise DataError(
            "isic.real.artifact_csv: not set; the real ISIC ingest keeps only images with "
            f"artifact annotations and needs a CSV with columns image,{','.join(ARTIFACTS)}[,vasc]"
        )
    hashes = {
        name: (check_known_hash(h, f"known hash of {name}") if h is not None else None)
        for name in DOWNLOAD_ORDER
        for h in [pinned(ISIC_2019_SHA256, known_hashes, name)]
    }
    if root is not None:
        if download:
            log.info("isic.real.root is set: using the local copy, not downloading")
        src = Path(root)
        verified: set[str] = set()
    elif download:
        src = _download(Path(cache_dir), check_base_url(base_url, "isic.real.base_url"), hashes, progressbar)
        verified = set(DOWNLOAD_ORDER)  # pooch checked every file against its pinned hash
    else:
        raise DataError(
            "isic.real: neither root (a local ISIC 2019 copy) nor download: true is set; "
            "expected one of them for isic.source=real"
        )
    return _build(out_dir, src, Path(artifact_csv), hashes, verified, progressbar)


def _download(cache: Path, base_url: str, hashes: Mapping[str, Optional[str]], progressbar: bool) -> Path:
    unpinned = [n for n in DOWNLOAD_ORDER if hashes[n] is None]
    if unpinned:
        raise DataError(
            f"{base_url}: no verified checksum is pinned for {unpinned}; a download needs one "
            "per file. Pass known_hashes={'<file>': 'sha256:<64 hex>'} (params: "
            "isic.real.known_hashes) computed with sha256sum from a copy you trust, or use "
            "isic.real.root with a local copy"
        )
    for name in DOWNLOAD_ORDER:
        fetch(f"{base_url}/{name}", cache / name, known_hash=hashes[name], progressbar=progressbar)
    return cache


def _locate(src: Path) -> tuple[Path, Optional[Path], Optional[Path], Optional[Path]]:
    """(ground truth csv, metadata csv or None, image folder or None, zip or None)."""
    if src.is_file() and src.suffix.lower() == ".zip":
        base, zpath = src.parent, src
    elif src.is_dir():
        base, zpath = src, None
    else:
        raise DataError(f"{src}: not found; expected a folder with {GROUND_TRUTH} and {INPUT_DIR}/ or {INPUT_ZIP}")
    gt = base / GROUND_TRUTH
    if not gt.is_file():
        raise DataError(f"{gt}: ground truth file not found; expected the ISIC 2019 {GROUND_TRUTH}")
    meta = base / METADATA if (base / METADATA).is_file() else None
    img_dir = None
    if zpath is None:
        d = base / INPUT_DIR
        if (d / INPUT_DIR).is_dir():  # Kaggle-style double nesting
            d = d / INPUT_DIR
        if d.is_dir():
            img_dir = d
        elif (base / INPUT_ZIP).is_file():
            zpath = base / INPUT_ZIP
        else:
            raise DataError(f"{base}: neither {INPUT_DIR}/ nor {INPUT_ZIP} found; expected the ISIC 2019 training images")
    return gt, meta, img_dir, zpath


def _read_ground_truth(path: Path) -> pd.DataFrame:
    df = read_table(path, GT_COLUMNS)
    df["image"] = df["image"].astype(str).str.strip()
    _check_unique(df, path)
    for c in ("MEL", "NV"):
        _to_binary(df, c, path)
    both = df["MEL"].eq(1) & df["NV"].eq(1)
    if both.any():  # ISIC diagnoses are one-hot; the prompt grammar relies on it
        raise DataError(f"{path}: image {df.loc[both, 'image'].iloc[0]} is both MEL and NV; expected one-hot diagnoses")
    return df[["image", "MEL", "NV"]]


def _read_artifacts(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: artifact annotation file not found")
    try:  # sep=None sniffs ',' / ';' / tab (Bissoto et al. use ';')
        df = pd.read_csv(path, sep=None, engine="python")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed") and str(c).strip()]]
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ["image", *ARTIFACTS] if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing artifact columns {missing}; expected image,{','.join(ARTIFACTS)} "
            f"(vasc optional), found {list(df.columns)}"
        )
    df["image"] = df["image"].astype(str).str.strip().map(lambda s: re.sub(r"\.(png|jpe?g)$", "", s, flags=re.I))
    _check_unique(df, path)
    for c, fill in OPTIONAL_ARTIFACTS.items():
        if c not in df.columns:
            df[c] = fill
    for c in [*ARTIFACTS, *OPTIONAL_ARTIFACTS]:
        _to_binary(df, c, path)
    return df[["image", *ARTIFACTS, *OPTIONAL_ARTIFACTS]]


def _check_unique(df: pd.DataFrame, path: Path) -> None:
    dup = df["image"][df["image"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: image ids must be unique; duplicated {sorted(set(dup))[:5]}")


def _to_binary(df: pd.DataFrame, col: str, path: Path) -> None:
    v = pd.to_numeric(df[col], errors="coerce")
    bad = ~v.isin([0, 1])
    if bad.any():
        i = bad.to_numpy().nonzero()[0][0]
        raise DataError(
            f"{path}: column {col!r} must be 0/1 for every image; image {df['image'].iloc[i]} has {df[col].iloc[i]!r}"
        )
    df[col] = v.astype(int)


def _build(
    out_dir: Path,
    src: Path,
    artifact_csv: Path,
    hashes: Mapping[str, Optional[str]],
    verified: set[str],
    progressbar: bool,
) -> dict[str, float]:
    gt_path, meta_path, img_dir, zpath = _locate(src)
    for name, p in ((GROUND_TRUTH, gt_path), (METADATA, meta_path), (INPUT_ZIP, zpath)):
        if p is not None and name not in verified and hashes.get(name) is not None:
            verify_file(p, hashes[name])
    gt = _read_ground_truth(gt_path)
    if meta_path is not None:
        read_table(meta_path, META_COLUMNS)
    art = _read_artifacts(artifact_csv)
    labels = art.merge(gt, on="image", how="inner", validate="one_to_one")
    n_dropped = len(art) - len(labels)
    if n_dropped:
        log.warning("%s: %d annotated images have no ground truth in %s; dropped", artifact_csv, n_dropped, gt_path)
    if labels.empty:
        raise DataError(f"{artifact_csv}: none of its {len(art)} images appear in {gt_path}; expected ISIC 2019 training image ids")
    labels = labels.sort_values("image", kind="stable").reset_index(drop=True)[ISIC_COLUMNS]

    with atomic_dir(out_dir) as tmp:
        images = tmp / "images"
        images.mkdir()
        if zpath is not None:
            _copy_from_zip(zpath, labels["image"].tolist(), images, progressbar)
        else:
            _copy_from_dir(img_dir, labels["image"].tolist(), images, progressbar)
        write_table(labels, tmp / "labels.csv")

    out: dict[str, float] = {
        "n_images": float(len(labels)),
        "n_annotated": float(len(art)),
        "n_annotated_without_ground_truth": float(n_dropped),
    }
    for c in ISIC_COLUMNS[1:]:
        out[f"n_{c}"] = float(labels[c].sum())
    return out


def _copy_from_dir(img_dir: Path, ids: list[str], dst: Path, progressbar: bool) -> None:
    for image in progress(ids, desc="isic images", disable=not progressbar):
        src = img_dir / f"{image}.jpg"
        if not src.is_file():
            raise DataError(f"{src}: image not found; it is annotated and in the ground truth")
        verify_image(src, src)
        link_or_copy(src, dst / f"{image}.jpg")


def _copy_from_zip(zpath: Path, ids: list[str], dst: Path, progressbar: bool) -> None:
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{zpath}: not a readable zip archive ({e}); expected {INPUT_ZIP}") from None
    with zf:
        index = {}
        for member in zf.namelist():
            name = member.rsplit("/", 1)[-1]
            if name.lower().endswith(".jpg") and not name.startswith("."):
                index.setdefault(name[:-4], member)
        for image in progress(ids, desc="isic images", disable=not progressbar):
            member = index.get(image)
            if member is None:
                raise DataError(f"{zpath}: no member {INPUT_DIR}/{image}.jpg; it is annotated and in the ground truth")
            try:
                data = zf.read(member)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
                raise DataError(f"{zpath}: member {member} is corrupt ({e})") from None
            verify_image(io.BytesIO(data), f"{zpath}:{member}")
            (dst / f"{image}.jpg").write_bytes(data)
