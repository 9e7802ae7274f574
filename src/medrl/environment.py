"""The software environment a stage ran in, and the lock file that pins it.

``environment_record`` is what every stage's MLflow run records next to its git commit: the
interpreter, the platform, the versions of the packages that can change a number in a
table, the device and the default dtype. ``write_lock`` resolves the project's dependencies
into ``requirements.lock`` (exact versions and sha256 hashes, via pip's own resolver) and
``check_lock`` compares an installed environment with it.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# Packages whose version can change a result (a scheduler, an attention kernel, a metric).
RESULT_PACKAGES = (
    "torch", "torchvision", "diffusers", "transformers", "tokenizers", "peft", "accelerate", "safetensors",
    "torch-fidelity", "torchxrayvision", "torchmetrics", "numpy", "scipy", "scikit-image", "scikit-learn",
    "pandas", "pillow",
)

LOCK_HEADER = """\
# requirements.lock: the exact versions (and sha256 of each file) that `make run` and
# `make test` install, for Linux x86_64 / CPython 3.11. Refresh: `make lock`.
"""


def package_versions(names: tuple[str, ...] = RESULT_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment_record(device: str = "cpu") -> dict[str, str]:
    """Interpreter, platform, result-relevant package versions, device and dtype."""
    import torch

    rec = {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "device": device,
        "dtype": str(torch.get_default_dtype()).replace("torch.", ""),
        "torch.threads": str(torch.get_num_threads()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        rec["cuda"] = str(torch.version.cuda)
        rec["gpu"] = torch.cuda.get_device_name(0)
    rec.update({f"pkg.{k}": v for k, v in package_versions().items()})
    return rec


def environment_hash(record: dict[str, str]) -> str:
    """Short digest of what decides numbers; thread count excluded (it changes no result here)."""
    keep = {k: v for k, v in record.items() if k != "torch.threads"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the lock file


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def resolve_lock(project: Path, extras: str = "test") -> str:
    """Resolve ``project[extras]`` from scratch with pip (a dry run: nothing is installed) and
    return the lock text: one ``name==version --hash=sha256:...`` line per package."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), f"{project}[{extras}]"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip could not resolve {project}[{extras}]:\n{proc.stderr[-3000:]}")
        items = json.loads(report.read_text())["install"]
    own = _canonical(_project_name(project))
    lines = []
    for item in sorted(items, key=lambda i: _canonical(i["metadata"]["name"])):
        name = _canonical(item["metadata"]["name"])
        if name == own:
            continue
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise RuntimeError(f"pip reported no sha256 for {name} ({item['download_info'].get('url')})")
        lines.append(f"{name}=={item['metadata']['version']} --hash=sha256:{hashes['sha256']}")
    return LOCK_HEADER + "\n".join(lines) + "\n"


def _project_name(project: Path) -> str:
    import tomllib

    return tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]


def read_lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec = line.split()[0]
        if "==" not in spec:
            raise ValueError(f"{path}: '{spec}' is not pinned with ==")
        name, version = spec.split("==", 1)
        pins[_canonical(name)] = version
    return pins


def installed_versions() -> dict[str, str]:
    return {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def check_lock(path: Path, own: str = "medrl") -> tuple[list[str], list[str]]:
    """(mismatches, extras): locked packages missing or at another version, and installed
    packages the lock does not name (tools added by hand). Both empty: an exact match."""
    pins, have = read_lock(path), installed_versions()
    have.pop(_canonical(own), None)
    for tool in ("pip", "setuptools", "wheel"):  # the installer is not part of the lock unless pinned
        if tool not in pins:
            have.pop(tool, None)
    mismatches = [f"{n}: locked {v}, installed {have.get(n, 'nothing')}" for n, v in sorted(pins.items())
                  if have.get(n) != v]
    extras = [f"{n}=={v}" for n, v in sorted(have.items()) if n not in pins]
    return mismatches, extras
