"""Procedural phantom datasets with exact ground truth (the embedded default).

`generate_derm_phantoms` (derm.py) and `generate_cxr_phantoms` (cxr.py) are imported lazily
so that importing one generator does not pull in the other's dependencies."""
from __future__ import annotations

from typing import Any

__all__ = ["generate_cxr_phantoms", "generate_derm_phantoms"]


def __getattr__(name: str) -> Any:
    if name == "generate_derm_phantoms":
        from medrl.data.phantoms.derm import generate_derm_phantoms

        return generate_derm_phantoms
    if name == "generate_cxr_phantoms":
        from medrl.data.phantoms.cxr import generate_cxr_phantoms

        return generate_cxr_phantoms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
