"""Issue 17 item 9: the content / params hashes lineage records, checked against independent
computations (hashlib over the bytes, known digests) rather than against themselves."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medrl.config import params_hash
from medrl.io import hash_path

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 test vector


def independent_hash(path: Path) -> str:
    """hashlib over the bytes: a file's sha256; a directory's sha256 over, per visible file (names
    not starting with '.'; a folder's files by name, then its sub-folders by name), the lines
    ``relpath \\0 file-sha256 \\n``."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    lines: list[bytes] = []

    def walk(d: Path) -> None:
        entries = sorted((e for e in d.iterdir() if not e.name.startswith(".")), key=lambda e: e.name)
        for f in (e for e in entries if e.is_file()):
            lines.append(f.relative_to(path).as_posix().encode() + b"\0"
                         + hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
        for sub in (e for e in entries if e.is_dir()):
            walk(sub)

    walk(path)
    return hashlib.sha256(b"".join(lines)).hexdigest()


def test_file_hash_is_sha256_of_the_bytes(tmp_path):
    (tmp_path / "abc.txt").write_bytes(b"abc")
    assert hash_path(tmp_path / "abc.txt") == ABC_SHA256


def test_directory_hash_matches_independent_computation(tmp_path):
    d = tmp_path / "out"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"abc")
    (d / "a.csv").write_text("x\n1\n")
    (d / "sub" / "z.bin").write_bytes(bytes(range(256)))
    (d / "sub" / "deeper" / "k.json").write_text("{}")
    (d / ".partial").write_text("hidden: not part of the identity")
    expected = hashlib.sha256(
        b"a.csv\0" + hashlib.sha256(b"x\n1\n").hexdigest().encode() + b"\n"
        + b"b.txt\0" + ABC_SHA256.encode() + b"\n"
        + b"sub/z.bin\0" + hashlib.sha256(bytes(range(256))).hexdigest().encode() + b"\n"
        + b"sub/deeper/k.json\0" + hashlib.sha256(b"{}").hexdigest().encode() + b"\n").hexdigest()
    assert independent_hash(d) == expected
    assert hash_path(d) == expected


def test_params_hash_known_digest():
    values = {"cxr.prepare.size": 64, "cxr.source": "phantom"}
    blob = b'{"cxr.prepare.size": 64, "cxr.source": "phantom"}'
    assert json.dumps(values, sort_keys=True).encode() == blob
    assert params_hash(values) == hashlib.sha256(blob).hexdigest()[:16]
    assert params_hash({"b": 1, "a": 2}) == hashlib.sha256(b'{"a": 2, "b": 1}').hexdigest()[:16]
