"""ISIC 2019 ingest against a miniature archive with the real file names and columns,
served from 127.0.0.1 (download mode) or read from disk (local mode)."""
from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from httpserver import serve_directory
from medrl.data.isic import GROUND_TRUTH, INPUT_DIR, INPUT_ZIP, METADATA, acquire_isic
from medrl.data.prompts import ISIC_COLUMNS
from medrl.errors import DataError

IMAGES = [f"ISIC_{i:07d}" for i in (0, 1, 3, 4, 6, 7, 9)]
DIAG = ["MEL", "NV", "BCC", "MEL", "NV", "SCC", "NV"]  # one-hot diagnosis per image
ARTS = ["dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches"]
ANNOTATED = IMAGES[:6]  # ISIC_0000009 has no annotation -> must be dropped
EXTRA_ANNOTATED = "ISIC_0099999"  # annotated but not in the ground truth -> dropped, counted


def _jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _artifact_values(image: str) -> dict[str, int]:
    h = hashlib.sha256(image.encode()).digest()
    return {a: h[i] & 1 for i, a in enumerate(ARTS)}


def build_isic(src: Path) -> dict[str, bytes]:
    """The three ISIC 2019 training files (+ extracted folder) under ``src``."""
    src.mkdir(parents=True, exist_ok=True)
    folder = src / INPUT_DIR
    folder.mkdir()
    blobs = {}
    for i, image in enumerate(IMAGES):
        blobs[image] = _jpeg_bytes(i)
        (folder / f"{image}.jpg").write_bytes(blobs[image])
    (folder / "LICENSE.txt").write_text("CC-BY-NC\n")
    with zipfile.ZipFile(src / INPUT_ZIP, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"{INPUT_DIR}/{p.name}")
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    gt = pd.DataFrame({"image": IMAGES, **{c: [1.0 if d == c else 0.0 for d in DIAG] for c in classes}})
    gt.to_csv(src / GROUND_TRUTH, index=False)
    meta = pd.DataFrame({
        "image": IMAGES, "age_approx": [55.0] * len(IMAGES), "anatom_site_general": ["anterior torso"] * len(IMAGES),
        "lesion_id": [f"BCN_{i:07d}" for i in range(len(IMAGES))], "sex": ["female"] * len(IMAGES),
    })
    meta.to_csv(src / METADATA, index=False)
    return blobs


def write_artifacts(path: Path, *, vasc: bool = False, drop: str | None = None) -> Path:
    """Bissoto et al. layout: ';'-separated, unnamed index column, '.png' names, extra columns."""
    rows = []
    for image in [*ANNOTATED, EXTRA_ANNOTATED]:
        row = {"image": f"{image}.png", **_artifact_values(image), "label": 0, "label_string": "benign"}
        if vasc:
            row["vasc"] = 1 if image == IMAGES[1] else 0
        rows.append(row)
    df = pd.DataFrame(rows)
    if drop:
        df = df.drop(columns=drop)
    df.to_csv(path, sep=";")
    return path


def expected_labels(vasc: bool = False) -> pd.DataFrame:
    rows = []
    for image, d in zip(IMAGES, DIAG):
        if image not in ANNOTATED:
            continue
        rows.append({"image": image, "MEL": int(d == "MEL"), "NV": int(d == "NV"), **_artifact_values(image),
                     "vasc": int(vasc and image == IMAGES[1])})
    return pd.DataFrame(rows)[ISIC_COLUMNS]


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def archive(tmp_path: Path):
    src = tmp_path / "isic_src"
    blobs = build_isic(src)
    srv = tmp_path / "srv"
    srv.mkdir()
    for name in (INPUT_ZIP, GROUND_TRUTH, METADATA):
        shutil.copy(src / name, srv / name)
    hashes = {name: _sha(srv / name) for name in (INPUT_ZIP, GROUND_TRUTH, METADATA)}
    art = write_artifacts(tmp_path / "isic_bias.csv")
    return {"src": src, "srv": srv, "blobs": blobs, "hashes": hashes, "art": art, "tmp": tmp_path}


def _check_output(out: Path, blobs: dict[str, bytes], vasc: bool = False) -> None:
    labels = pd.read_csv(out / "labels.csv")
    assert list(labels.columns) == ISIC_COLUMNS
    pd.testing.assert_frame_equal(labels, expected_labels(vasc), check_dtype=False)
    assert all(labels[c].dtype.kind == "i" for c in ISIC_COLUMNS[1:])
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == sorted(f"{i}.jpg" for i in ANNOTATED)
    for image in ANNOTATED:  # original bytes, untouched
        assert (out / "images" / f"{image}.jpg").read_bytes() == blobs[image]


def test_download_mode_end_to_end(archive):
    out, cache = archive["tmp"] / "out", archive["tmp"] / "cache"
    with serve_directory(archive["srv"]) as srv:
        counts = acquire_isic(out, root=None, download=True, base_url=srv.url, artifact_csv=str(archive["art"]),
                              cache_dir=str(cache), known_hashes=archive["hashes"], progressbar=False)
        assert {h.path for h in srv.hits()} == {f"/{n}" for n in (INPUT_ZIP, GROUND_TRUTH, METADATA)}
        n_first = len(srv.hits())
        # second run: every cached file matches its pinned hash, nothing is fetched again
        acquire_isic(out, root=None, download=True, base_url=srv.url, artifact_csv=str(archive["art"]),
                     cache_dir=str(cache), known_hashes=archive["hashes"], progressbar=False)
        assert len(srv.hits()) == n_first
    _check_output(out, archive["blobs"])
    exp = expected_labels()
    assert counts["n_images"] == len(ANNOTATED)
    assert counts["n_annotated"] == len(ANNOTATED) + 1
    assert counts["n_annotated_without_ground_truth"] == 1
    assert counts["n_MEL"] == exp["MEL"].sum() and counts["n_hair"] == exp["hair"].sum()
    assert counts["n_vasc"] == 0
    assert not list(cache.glob("*.part"))


def test_download_resumes_after_interruption(archive):
    out, cache = archive["tmp"] / "out", archive["tmp"] / "cache"
    size = (archive["srv"] / INPUT_ZIP).stat().st_size
    cut = size // 2
    with serve_directory(archive["srv"], cut_after={f"/{INPUT_ZIP}": cut}) as srv:
        kw = dict(root=None, download=True, base_url=srv.url, artifact_csv=str(archive["art"]),
                  cache_dir=str(cache), known_hashes=archive["hashes"], progressbar=False)
        with pytest.raises(DataError, match=INPUT_ZIP) as err:
            acquire_isic(out, **kw)
        assert "interrupted" in str(err.value) and "resumes" in str(err.value)
        assert not out.exists()
        part = cache / f"{INPUT_ZIP}.part"
        assert part.stat().st_size == cut
        acquire_isic(out, **kw)
        zip_hits = srv.hits(INPUT_ZIP)
    assert [h.range for h in zip_hits] == [None, f"bytes={cut}-"]
    assert [h.status for h in zip_hits] == [200, 206]
    assert not part.exists()
    assert (cache / INPUT_ZIP).read_bytes() == (archive["srv"] / INPUT_ZIP).read_bytes()
    _check_output(out, archive["blobs"])


def test_download_refuses_without_pinned_hash(archive):
    out = archive["tmp"] / "out"
    hashes = dict(archive["hashes"])
    del hashes[INPUT_ZIP]  # the module registry has no verified value for it
    with serve_directory(archive["srv"]) as srv:
        with pytest.raises(DataError) as err:
            acquire_isic(out, root=None, download=True, base_url=srv.url, artifact_csv=str(archive["art"]),
                         cache_dir=str(archive["tmp"] / "cache"), known_hashes=hashes, progressbar=False)
        assert srv.log == []  # refused before any byte was fetched
    msg = str(err.value)
    assert INPUT_ZIP in msg and "known_hashes" in msg and "sha256" in msg
    assert not out.exists()


def test_checksum_mismatch_names_file_and_keeps_nothing(archive):
    out, cache = archive["tmp"] / "out", archive["tmp"] / "cache"
    hashes = dict(archive["hashes"], **{GROUND_TRUTH: "sha256:" + "0" * 64})
    with serve_directory(archive["srv"]) as srv:
        with pytest.raises(DataError) as err:
            acquire_isic(out, root=None, download=True, base_url=srv.url, artifact_csv=str(archive["art"]),
                         cache_dir=str(cache), known_hashes=hashes, progressbar=False)
    assert GROUND_TRUTH in str(err.value) and "checksum mismatch" in str(err.value)
    assert not out.exists()
    assert not (cache / GROUND_TRUTH).exists()
    assert not list(cache.glob("*.part")) and not list(cache.glob("tmp*"))


def test_http_404_names_file(archive):
    out = archive["tmp"] / "out"
    with serve_directory(archive["srv"]) as srv:
        with pytest.raises(DataError) as err:
            acquire_isic(out, root=None, download=True, base_url=srv.url + "/wrong", artifact_csv=str(archive["art"]),
                         cache_dir=str(archive["tmp"] / "cache"), known_hashes=archive["hashes"], progressbar=False)
    assert GROUND_TRUTH in str(err.value) and "404" in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("layout", ["folder", "zip_in_root", "root_is_zip"])
def test_local_modes(archive, layout):
    src = archive["src"]
    if layout == "zip_in_root":
        shutil.rmtree(src / INPUT_DIR)
        root = src
    elif layout == "root_is_zip":
        shutil.rmtree(src / INPUT_DIR)
        root = src / INPUT_ZIP
    else:
        (src / INPUT_ZIP).unlink()
        root = src
    art = write_artifacts(archive["tmp"] / "art_vasc.csv", vasc=True)
    out = archive["tmp"] / "out"
    counts = acquire_isic(out, root=str(root), download=False, base_url="http://unused.invalid",
                          artifact_csv=str(art), cache_dir=str(archive["tmp"] / "cache"), progressbar=False)
    _check_output(out, archive["blobs"], vasc=True)
    assert counts["n_vasc"] == 1
    assert not (archive["tmp"] / "cache").exists()  # local mode never touches the cache


def test_local_pinned_hash_is_checked(archive):
    out = archive["tmp"] / "out"
    with pytest.raises(DataError, match=GROUND_TRUTH + ".*checksum mismatch"):
        acquire_isic(out, root=str(archive["src"]), download=False, base_url="http://unused.invalid",
                     artifact_csv=str(archive["art"]), cache_dir=str(archive["tmp"] / "cache"),
                     known_hashes={GROUND_TRUTH: "sha256:" + "f" * 64}, progressbar=False)
    assert not out.exists()


def test_ground_truth_wrong_columns(archive):
    gt = archive["src"] / GROUND_TRUTH
    pd.read_csv(gt).drop(columns=["NV"]).to_csv(gt, index=False)
    out = archive["tmp"] / "out"
    with pytest.raises(DataError) as err:
        acquire_isic(out, root=str(archive["src"]), download=False, base_url="http://unused.invalid",
                     artifact_csv=str(archive["art"]), cache_dir="unused", progressbar=False)
    assert str(gt) in str(err.value) and "'NV'" in str(err.value)
    assert not out.exists()


def test_artifact_csv_missing_columns(archive):
    art = write_artifacts(archive["tmp"] / "bad_art.csv", drop=["ruler", "ink"])
    out = archive["tmp"] / "out"
    with pytest.raises(DataError) as err:
        acquire_isic(out, root=str(archive["src"]), download=False, base_url="http://unused.invalid",
                     artifact_csv=str(art), cache_dir="unused", progressbar=False)
    msg = str(err.value)
    assert str(art) in msg and "'ruler'" in msg and "'ink'" in msg and "vasc" not in msg.split("expected")[0]
    assert not out.exists()


def test_artifact_values_must_be_binary(archive):
    art = archive["tmp"] / "art.csv"
    df = pd.read_csv(archive["art"], sep=";", index_col=0)
    df.loc[2, "hair"] = 2
    df.to_csv(art, sep=";")
    with pytest.raises(DataError, match="'hair'.*ISIC_0000003"):
        acquire_isic(archive["tmp"] / "out", root=str(archive["src"]), download=False, base_url="http://unused.invalid",
                     artifact_csv=str(art), cache_dir="unused", progressbar=False)


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_corrupt_jpeg_names_file(archive, layout):
    src, victim = archive["src"], IMAGES[3]
    blob = archive["blobs"][victim]
    (src / INPUT_DIR / f"{victim}.jpg").write_bytes(blob[: len(blob) // 2])  # truncated JPEG
    if layout == "zip":
        (src / INPUT_ZIP).unlink()
        with zipfile.ZipFile(src / INPUT_ZIP, "w") as zf:
            for p in sorted((src / INPUT_DIR).iterdir()):
                zf.write(p, f"{INPUT_DIR}/{p.name}")
        shutil.rmtree(src / INPUT_DIR)
    out = archive["tmp"] / "out"
    out.mkdir()
    (out / "marker").write_text("previous good output")
    with pytest.raises(DataError) as err:
        acquire_isic(out, root=str(src), download=False, base_url="http://unused.invalid",
                     artifact_csv=str(archive["art"]), cache_dir="unused", progressbar=False)
    assert f"{victim}.jpg" in str(err.value) and "unreadable image" in str(err.value)
    # the previous output is untouched and no temp sibling is left behind
    assert sorted(p.name for p in out.iterdir()) == ["marker"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".out")] == []


def test_missing_artifact_csv_is_an_error(archive):
    with pytest.raises(DataError, match="artifact_csv"):
        acquire_isic(archive["tmp"] / "out", root=str(archive["src"]), download=False,
                     base_url="http://unused.invalid", artifact_csv=None, cache_dir="unused", progressbar=False)
