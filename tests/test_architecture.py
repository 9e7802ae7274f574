"""The package's shape, enforced: layer order of imports, no private names across modules, short functions.

Layer order (lowest first); a module may import from its own layer or any lower one, never a higher one:

0. ``base``      -- errors, io, config, environment, redact, checkpoints, lr_schedule, progress (and the package root).
1. ``data``      -- ingest, phantoms, prompts, reports, tokenizer, prepare.
2. ``diffusion`` -- the SD stack (load/build, VAE and UNet training, latents), DDIM with log-probs, rollouts,
                    the Sampler and its seed policy, LoRA, ACE, image generation.
3. ``models``    -- the reward/evaluator networks (classifiers, posture, xrv_diag, dual_encoder) with their
                    shared training helpers.
4. ``rewards``   -- reward functions; the CXR reward's RLCF anchors are sampled with ``diffusion.sampler``.
5. ``rl``        -- PPO and the DDPO trainer (it gets its reward as an argument, never imports one).
6. ``metrics``   -- evaluation and analyses (they score samples with the reward/evaluator networks; the
                    RLCF mode comparison lives here).
7. ``tables``    -- paper tables built from the metrics.
8. ``app``       -- cli, bench, lineage, mlflow_view, __main__: entry points and run bookkeeping.

Lazy imports inside functions count like top-level ones.
"""
from __future__ import annotations

import ast
from pathlib import Path

import medrl

PKG = Path(medrl.__file__).resolve().parent
SRC = PKG.parent

LAYERS = ["base", "data", "diffusion", "models", "rewards", "rl", "metrics", "tables", "app"]
RANK = {name: i for i, name in enumerate(LAYERS)}
PACKAGE_LAYER = {"data": "data", "diffusion": "diffusion", "models": "models", "rewards": "rewards", "rl": "rl",
                 "metrics": "metrics", "tables": "tables"}
TOP_LEVEL = {"errors": "base", "io": "base", "config": "base", "environment": "base", "redact": "base",
             "checkpoints": "base", "lr_schedule": "base", "progress": "base", "__init__": "base",
             "cli": "app", "bench": "app", "lineage": "app", "mlflow_view": "app", "__main__": "app"}

# Private names crossing a module that sit in files owned by another engineer; they fix them and
# remove the entry. Format: (importing module, imported module, name).
PRIVATE_IMPORT_EXEMPT: set[tuple[str, str, str]] = set()

# Functions over MAX_LINES in files owned by another engineer, who splits them and removes the entry.
MAX_LINES = 80
# (rl/trainer.py train_ddpo was split by its owner; test_long_function_allowlist_is_not_stale keeps this
# list from outliving its entries.)
LONG_FUNCTION_ALLOWLIST: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "medrl", module
    if len(parts) == 1:
        return "base"
    if parts[1] in PACKAGE_LAYER:
        return PACKAGE_LAYER[parts[1]]
    if parts[1] in TOP_LEVEL:
        return TOP_LEVEL[parts[1]]
    raise AssertionError(f"{module}: no layer assigned; add it to tests/test_architecture.py")


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every medrl import, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "medrl"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "medrl":
                continue
            out += [(target, a.name, node.lineno) for a in node.names]
    return out


def _resolve(target: str, name: str | None, modules: dict[str, Path]) -> str:
    """The module an import reaches: ``from medrl.tables import paper`` reaches medrl.tables.paper."""
    if name is not None and f"{target}.{name}" in modules:
        return f"{target}.{name}"
    return target


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_no_import_runs_upward():
    modules = _modules()
    offenders = []
    for module, path in modules.items():
        own = layer_of(module)
        for target, name, line in _imports(module, path):
            reached = _resolve(target, name, modules)
            if RANK[layer_of(reached)] > RANK[own]:
                offenders.append(f"{path.relative_to(SRC)}:{line}: {module} ({own}) imports {reached} "
                                 f"({layer_of(reached)})")
    assert not offenders, "imports from a lower layer to a higher one:\n" + "\n".join(offenders)


def test_no_private_name_crosses_a_module():
    modules = _modules()
    offenders = []
    for module, path in modules.items():
        for target, name, line in _imports(module, path):
            if name is None or not name.startswith("_") or name.startswith("__"):
                continue
            if _resolve(target, name, modules) != target:  # a submodule, not a name
                continue
            if target != module and (module, target, name) not in PRIVATE_IMPORT_EXEMPT:
                offenders.append(f"{path.relative_to(SRC)}:{line}: {module} imports private {target}.{name}")
    assert not offenders, "private names imported from another module:\n" + "\n".join(offenders)


def _long_functions() -> dict[str, int]:
    out = {}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = child.end_lineno - child.lineno + 1
                    if n > MAX_LINES:
                        out[f"{prefix}.{child.name}"] = n
                    visit(child, f"{prefix}.{child.name}")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}.{child.name}")

        visit(tree, module)
    return out


def test_no_long_functions():
    long = _long_functions()
    offenders = [f"{name}: {n} lines" for name, n in sorted(long.items()) if name not in LONG_FUNCTION_ALLOWLIST]
    assert not offenders, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(offenders)


def test_long_function_allowlist_is_not_stale():
    stale = sorted(LONG_FUNCTION_ALLOWLIST - set(_long_functions()))
    assert not stale, f"now short (or gone): remove from LONG_FUNCTION_ALLOWLIST: {stale}"


def test_the_checks_see_lazy_upward_and_private_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\n\n\ndef f():\n    from medrl.rewards.align import _hidden\n    import medrl.metrics.auroc\n")
    assert _imports("medrl.models.m", p) == [("medrl.rewards.align", "_hidden", 5), ("medrl.metrics.auroc", None, 6)]
    assert RANK[layer_of("medrl.rewards.align")] > RANK[layer_of("medrl.models.m")]
    assert _resolve("medrl.tables", "paper", _modules()) == "medrl.tables.paper"
