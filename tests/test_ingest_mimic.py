"""MIMIC-CXR-JPG ingest against a miniature tree in the exact PhysioNet layout, read from disk
(local mode) or served from 127.0.0.1 behind HTTP basic auth (download mode)."""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from httpserver import serve_directory
from medrl.data.mimic import CHEXPERT_LABELS, acquire_mimic
from medrl.data.reports import PATHOLOGIES
from medrl.errors import DataError

USER, PASSWORD = "alice", "Zq9-very-secret-PW"
AUTH_B64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
JPG, REP = "mimic-cxr-jpg/2.1.0", "mimic-cxr/2.0.0"


def _uuid(seed: str) -> str:
    h = hashlib.sha1(seed.encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


# (subject, study, view, split, has_report)
IMAGES = [
    (10000032, 50414267, "PA", "train", True),
    (10000032, 50414267, "LATERAL", "train", True),
    (10000032, 53189527, "AP", "validate", True),
    (10000764, 57375967, "PA", "train", True),
    (10000764, 57375967, "LL", "train", True),
    (11000011, 51029426, "AP", "train", True),
    (12000015, 52000001, "PA", "train", False),  # study without a report -> skipped
    (19000099, 59000001, "PA", "test", True),
    (19000099, 59000002, "AP", "test", True),
]
ROWS = [dict(dicom_id=_uuid(f"{s}-{t}-{v}"), subject_id=s, study_id=t, view=v, split=sp, report=r)
        for s, t, v, sp, r in IMAGES]
STUDIES = sorted({(r["subject_id"], r["study_id"]) for r in ROWS})


def _labels(study: int) -> dict[str, float]:
    rng = np.random.default_rng(study)
    vals = rng.choice([1.0, 0.0, -1.0, np.nan], size=len(CHEXPERT_LABELS))
    return dict(zip(CHEXPERT_LABELS, vals))


def _report(subject: int, study: int) -> str:
    return (f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n"
            f" FINDINGS:  Study {study} of patient {subject}. Heart size is normal.\n \n"
            f" IMPRESSION:  No acute cardiopulmonary process.\n")


def _study_rel(subject: int, study: int) -> str:
    return f"files/p{str(subject)[:2]}/p{subject}/s{study}"


def _jpeg(seed: str) -> bytes:
    rng = np.random.default_rng(int(hashlib.sha1(seed.encode()).hexdigest()[:8], 16))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(40, 48), dtype=np.uint8), mode="L").save(buf, format="JPEG")
    return buf.getvalue()


def _gz_csv(df: pd.DataFrame, path: Path) -> None:
    with gzip.open(path, "wt", newline="") as f:
        df.to_csv(f, index=False)


def build_mimic(root: Path, reports: str = "inside") -> None:
    """MIMIC-CXR-JPG 2.1.0 tree + MIMIC-CXR reports (``inside`` | ``beside`` | ``zip``)."""
    root.mkdir(parents=True)
    for r in ROWS:
        p = root / _study_rel(r["subject_id"], r["study_id"]) / f"{r['dicom_id']}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_jpeg(r["dicom_id"]))
    meta = pd.DataFrame({
        "dicom_id": [r["dicom_id"] for r in ROWS], "subject_id": [r["subject_id"] for r in ROWS],
        "study_id": [r["study_id"] for r in ROWS], "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
        "ViewPosition": [r["view"] for r in ROWS], "Rows": 3056, "Columns": 2544, "StudyDate": 21800506,
        "StudyTime": 213014.531, "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
        "ViewCodeSequence_CodeMeaning": "postero-anterior", "PatientOrientationCodeSequence_CodeMeaning": "Erect",
    })
    _gz_csv(meta, root / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = pd.DataFrame({k: [r[k2] for r in ROWS] for k, k2 in
                          (("dicom_id", "dicom_id"), ("study_id", "study_id"), ("subject_id", "subject_id"), ("split", "split"))})
    _gz_csv(split, root / "mimic-cxr-2.0.0-split.csv.gz")
    chex = pd.DataFrame([{"subject_id": s, "study_id": t, **_labels(t)} for s, t in STUDIES])
    _gz_csv(chex, root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    texts = {(s, t): _report(s, t) for s, t in STUDIES
             if any(r["report"] for r in ROWS if (r["subject_id"], r["study_id"]) == (s, t))}
    if reports == "zip":
        with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for (s, t), text in texts.items():
                zf.writestr(f"mimic-cxr-reports/{_study_rel(s, t)}.txt", text)
    else:
        base = root / "mimic-cxr-reports" if reports == "inside" else root
        for (s, t), text in texts.items():
            p = base / f"{_study_rel(s, t)}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)


def expected_rows(max_images: int | None = None, exclude: tuple[str, ...] = ()) -> list[dict]:
    cands = [r for r in ROWS if r["view"] in ("PA", "AP") and r["report"] and r["dicom_id"] not in exclude]
    cands.sort(key=lambda r: hashlib.sha256(r["dicom_id"].encode()).hexdigest())
    if max_images is not None:
        cands = cands[:max_images]
    return sorted(cands, key=lambda r: (r["subject_id"], r["study_id"], r["dicom_id"]))


OUT_COLUMNS = ["image", "subject_id", "study_id", "view", "split", "report", *PATHOLOGIES, "Support Devices",
               "sx", "sy", "tx", "ty", "theta"]


def check_output(out: Path, rows: list[dict]) -> pd.DataFrame:
    meta = pd.read_csv(out / "metadata.csv")
    assert list(meta.columns) == OUT_COLUMNS
    assert meta["image"].tolist() == [r["dicom_id"] for r in rows]
    assert meta["view"].tolist() == [r["view"] for r in rows]
    assert meta["split"].tolist() == [r["split"] for r in rows]
    assert meta["subject_id"].tolist() == [r["subject_id"] for r in rows]
    for i, r in enumerate(rows):
        assert meta["report"][i] == _report(r["subject_id"], r["study_id"]).strip()
        lab = _labels(r["study_id"])
        for c in PATHOLOGIES + ["Support Devices"]:
            src = "Pleural Effusion" if c == "Effusion" else c
            want, got = lab[src], meta[c][i]
            assert (np.isnan(want) and np.isnan(got)) or want == got, (c, want, got)
        jpg = (out / "images" / f"{r['dicom_id']}.jpg").read_bytes()
        assert jpg == _jpeg(r["dicom_id"])  # original bytes
    assert meta[["sx", "sy", "tx", "ty", "theta"]].isna().all().all()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{r['dicom_id']}.jpg" for r in rows)
    return meta


@pytest.mark.parametrize("reports", ["inside", "beside", "zip"])
def test_local_mode(tmp_path, reports):
    root = tmp_path / "mimic"
    build_mimic(root, reports)
    out = tmp_path / "out"
    counts = acquire_mimic(out, root=str(root), download=False, base_url="http://unused.invalid",
                           cache_dir=str(tmp_path / "cache"), progressbar=False)
    rows = expected_rows()
    meta = check_output(out, rows)
    assert counts["n_images"] == len(rows) == 6
    assert counts["n_studies_without_report"] == 1
    assert counts["n_PA"] == sum(r["view"] == "PA" for r in rows)
    assert counts["n_validate"] == 1 and counts["n_test"] == 2
    assert set(meta["split"]) == {"train", "validate", "test"}
    # labels: integer codes, not "1.0"
    raw = pd.read_csv(out / "metadata.csv", dtype=str)
    vals = set(raw[PATHOLOGIES].stack().dropna().unique())
    assert vals <= {"1", "0", "-1"} and "-1" in vals
    assert not (tmp_path / "cache").exists()


def test_local_partial_copy_and_max_images_deterministic(tmp_path):
    root = tmp_path / "mimic"
    build_mimic(root)
    gone = expected_rows()[0]
    (root / _study_rel(gone["subject_id"], gone["study_id"]) / f"{gone['dicom_id']}.jpg").unlink()
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        counts = acquire_mimic(out, root=str(root), download=False, base_url="http://unused.invalid",
                               cache_dir="unused", max_images=2, progressbar=False)
        outs.append((out / "metadata.csv").read_text())
        check_output(out, expected_rows(2, exclude=(gone["dicom_id"],)))
        assert counts["n_missing_local"] == 1 and counts["n_images"] == 2
    assert outs[0] == outs[1]


def _serve_tree(tmp_path: Path) -> Path:
    """PhysioNet layout: files/<project>/<version>/..., each with SHA256SUMS.txt."""
    src = tmp_path / "src"
    build_mimic(src, reports="zip")
    srv = tmp_path / "srv"
    jpg = srv / JPG
    shutil.copytree(src, jpg, ignore=shutil.ignore_patterns("mimic-cxr-reports.zip"))
    (srv / REP).mkdir(parents=True)
    shutil.copy(src / "mimic-cxr-reports.zip", srv / REP / "mimic-cxr-reports.zip")
    for proj in (srv / JPG, srv / REP):
        lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(proj).as_posix()}"
                 for p in sorted(proj.rglob("*")) if p.is_file()]
        (proj / "SHA256SUMS.txt").write_text("\n".join(lines) + "\n")
    return srv


def _assert_no_secret(*places: Path, texts: tuple[str, ...] = ()) -> None:
    for t in texts:
        assert PASSWORD not in t and AUTH_B64 not in t
    for place in places:
        if not place.exists():
            continue
        for p in [place] if place.is_file() else place.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert PASSWORD.encode() not in data and AUTH_B64.encode() not in data, p
                if p.suffix == ".gz":
                    assert PASSWORD.encode() not in gzip.decompress(data), p


def test_download_mode_with_basic_auth(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PHYSIONET_USERNAME", USER)
    monkeypatch.setenv("PHYSIONET_PASSWORD", PASSWORD)
    srv_root = _serve_tree(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with serve_directory(srv_root, auth=(USER, PASSWORD)) as srv:
        counts = acquire_mimic(out, root=None, download=True, base_url=srv.url, cache_dir=str(cache),
                               max_images=3, workers=2)
        jpg_hits = sorted(h.path.rsplit("/", 1)[-1] for h in srv.hits(".jpg"))
        assert all(h.authorized for h in srv.log)
    rows = expected_rows(3)
    check_output(out, rows)
    assert counts["n_images"] == 3
    # only the chosen frontal images were fetched, never the laterals or the others
    assert jpg_hits == sorted(f"{r['dicom_id']}.jpg" for r in rows)
    # same result as local mode on the same tree
    acquire_mimic(tmp_path / "out_local", root=str(tmp_path / "src"), download=False, base_url="http://unused.invalid",
                  cache_dir="unused", max_images=3, progressbar=False)
    assert (out / "metadata.csv").read_text() == (tmp_path / "out_local" / "metadata.csv").read_text()
    captured = capsys.readouterr()
    _assert_no_secret(out, cache, texts=(caplog.text, captured.out, captured.err))
    assert "127.0.0.1" in caplog.text  # the logs were really captured


def test_download_rejects_bad_credentials_with_clear_message(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PHYSIONET_USERNAME", USER)
    monkeypatch.setenv("PHYSIONET_PASSWORD", PASSWORD)  # the server expects another one
    srv_root = _serve_tree(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with serve_directory(srv_root, auth=(USER, "the-right-one")) as srv:
        with pytest.raises(DataError) as err:
            acquire_mimic(out, root=None, download=True, base_url=srv.url, cache_dir=str(cache), progressbar=False)
        assert srv.log and not any(h.authorized for h in srv.log)
    msg = str(err.value)
    assert "401" in msg and "PHYSIONET_USERNAME" in msg and "PHYSIONET_PASSWORD" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not out.exists()
    captured = capsys.readouterr()
    _assert_no_secret(cache, texts=(msg, repr(err.value), caplog.text, captured.out, captured.err))


def test_download_without_credentials_fetches_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("PHYSIONET_USERNAME", raising=False)
    monkeypatch.delenv("PHYSIONET_PASSWORD", raising=False)
    with serve_directory(_serve_tree(tmp_path), auth=(USER, PASSWORD)) as srv:
        with pytest.raises(DataError, match="PHYSIONET_USERNAME and PHYSIONET_PASSWORD"):
            acquire_mimic(tmp_path / "out", root=None, download=True, base_url=srv.url,
                          cache_dir=str(tmp_path / "cache"), progressbar=False)
        assert srv.log == []


def test_download_checksum_mismatch_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSIONET_USERNAME", USER)
    monkeypatch.setenv("PHYSIONET_PASSWORD", PASSWORD)
    srv_root = _serve_tree(tmp_path)
    victim = expected_rows(3)[1]
    path = srv_root / JPG / _study_rel(victim["subject_id"], victim["study_id"]) / f"{victim['dicom_id']}.jpg"
    path.write_bytes(_jpeg("tampered"))  # SHA256SUMS.txt still lists the original
    out = tmp_path / "out"
    with serve_directory(srv_root, auth=(USER, PASSWORD)) as srv:
        with pytest.raises(DataError) as err:
            acquire_mimic(out, root=None, download=True, base_url=srv.url, cache_dir=str(tmp_path / "cache"),
                          max_images=3, workers=1, progressbar=False)
    assert f"{victim['dicom_id']}.jpg" in str(err.value) and "checksum mismatch" in str(err.value)
    assert not out.exists()


def test_base_url_with_credentials_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSIONET_USERNAME", USER)
    monkeypatch.setenv("PHYSIONET_PASSWORD", PASSWORD)
    with pytest.raises(DataError) as err:
        acquire_mimic(tmp_path / "out", root=None, download=True, base_url=f"https://{USER}:{PASSWORD}@physionet.org/files",
                      cache_dir=str(tmp_path / "cache"), progressbar=False)
    assert "credentials" in str(err.value) and PASSWORD not in str(err.value)


def test_wrong_columns_names_file(tmp_path):
    root = tmp_path / "mimic"
    build_mimic(root)
    p = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    _gz_csv(pd.read_csv(p).drop(columns=["Edema"]), p)
    with pytest.raises(DataError) as err:
        acquire_mimic(tmp_path / "out", root=str(root), download=False, base_url="http://unused.invalid",
                      cache_dir="unused", progressbar=False)
    assert str(p) in str(err.value) and "'Edema'" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_split_value_names_file(tmp_path):
    root = tmp_path / "mimic"
    build_mimic(root)
    p = root / "mimic-cxr-2.0.0-split.csv.gz"
    df = pd.read_csv(p)
    df.loc[0, "split"] = "holdout"
    _gz_csv(df, p)
    with pytest.raises(DataError, match=r"split.*holdout"):
        acquire_mimic(tmp_path / "out", root=str(root), download=False, base_url="http://unused.invalid",
                      cache_dir="unused", progressbar=False)


def test_corrupt_jpeg_names_file(tmp_path):
    root = tmp_path / "mimic"
    build_mimic(root)
    victim = expected_rows()[2]
    p = root / _study_rel(victim["subject_id"], victim["study_id"]) / f"{victim['dicom_id']}.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        acquire_mimic(out, root=str(root), download=False, base_url="http://unused.invalid",
                      cache_dir="unused", progressbar=False)
    assert str(p) in str(err.value) and "unreadable image" in str(err.value)
    assert not out.exists()
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".out")] == []
