"""Issue 17 item 1: a stage may read only the params keys it declares.

A key a stage reads without declaring it is invisible to DVC (``params:``) and Snakemake
(``params`` rerun trigger): changing it would not rerun the stage. entry.py hands every stage a
ParamsView that raises on such a read; here (a) the view's rules, (b) every stage function of
workflow/graph.py run under that view with the library calls stubbed out (so each ``c.params``
access of the stage code itself is exercised in milliseconds), in two configurations that take
the params-dependent branches (phantom/tiny vs real/pretrained), and (c) the reverse: every
declared key is read by its stage in one of the configurations.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from medrl.config import validate_params
from medrl.models.training import judge_pairs as REAL_JUDGE_PAIRS
from medrl.rl.trainer import DDPOConfig as REAL_DDPO_CONFIG
from medrl_testutil import REPO, small_params

sys.path.insert(0, str(REPO / "workflow"))
from entry import stage_paths  # noqa: E402
from graph import STAGES, Ctx, ParamsView, UndeclaredParamError, jobs_of, stage_params  # noqa: E402


@pytest.fixture(scope="module")
def params():
    return validate_params(small_params(), check_paths=False)


# ============================================================================= (a) the view


def test_view_raises_naming_stage_and_undeclared_key(params):
    v = ParamsView(params, "stack_isic", ("isic.prepare.size", "models.tiny"))
    with pytest.raises(UndeclaredParamError, match=r"stage stack_isic .*'run\.seed'"):
        v.run.seed
    with pytest.raises(UndeclaredParamError, match=r"stage stack_isic .*'run'"):
        v.run.model_dump()  # an undeclared section
    with pytest.raises(UndeclaredParamError, match=r"'isic\.prepare\.seed'"):
        v.isic.prepare.seed  # a sibling of a declared leaf
    with pytest.raises(UndeclaredParamError, match=r"'isic\.prepare'"):
        v.isic.prepare.model_dump()  # dumping a section only partly declared
    with pytest.raises(UndeclaredParamError, match=r"'<all params>'"):
        v.model_dump()


def test_view_grants_declared_keys_and_their_subtrees(params):
    v = ParamsView(params, "s", ("isic.prepare.size", "models.tiny", "metrics"))
    assert v.isic.prepare.size == params.isic.prepare.size  # intermediate access on the way
    assert getattr(v.models, "tiny").model_dump() == params.models.tiny.model_dump()  # a section: its subtree
    assert v.metrics.model_dump() == params.metrics.model_dump()
    assert v.metrics.augment.epochs == params.metrics.augment.epochs
    with pytest.raises(AttributeError):
        v.isic.prepare.no_such_key
    with pytest.raises(TypeError, match="read-only"):
        v.isic = None


def test_view_variant_wildcard_is_declared_per_value(params):
    variants = list(params.rl.cxr.variants)
    assert len(variants) >= 2
    mine, other = variants[0], variants[1]
    v = stage_params(STAGES["rl_cxr"], params, {"variant": mine, "seed": "1"})
    assert v.rl.cxr.variants[mine].model_dump() == params.rl.cxr.variants[mine].model_dump()
    with pytest.raises(UndeclaredParamError, match=rf"stage rl_cxr\[{mine}\]\[1\] .*'rl\.cxr\.variants\.{other}\.ace'"):
        v.rl.cxr.variants[other].ace
    with pytest.raises(UndeclaredParamError, match=r"'rl\.cxr\.variants'"):
        list(v.rl.cxr.variants)  # which variants exist is not rl_cxr's business
    with pytest.raises(UndeclaredParamError, match=r"'run\.device'"):
        v.run.device  # entry.py resolves the device; stages get Ctx.device
    with pytest.raises(UndeclaredParamError, match=r"'rl\.cxr\.seed'"):
        v.rl.cxr.seed  # an RL job's seed is its {seed} wildcard, not the default seed


def test_entry_hands_stages_the_enforcing_view():
    src = (REPO / "workflow" / "entry.py").read_text()
    assert "Ctx(params=stage_params(stage, params, wildcards)" in src


# ============================================================================= (b) every stage


class RecordingView(ParamsView):
    reads: set[str] = set()

    def _child(self, name, value):
        out = super()._child(name, value)
        RecordingView.reads.add(f"{self._path}.{name}" if self._path else str(name))
        return out


def _library_imports() -> dict[str, list[str]]:
    """``from medrl.X import a, b`` inside graph.py's stage functions (the library calls)."""
    mods: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse((REPO / "workflow" / "graph.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medrl"):
            mods.setdefault(node.module, []).extend(a.name for a in node.names)
    return mods


@pytest.fixture
def stubbed_library(monkeypatch):
    """Replace every library function/class a stage calls by a MagicMock (constants and
    medrl.config stay real), so a stage function runs in microseconds without data."""
    imports = {m: n for m, n in _library_imports().items() if m != "medrl.config"}
    # import every module before patching any: a module imported while medrl.io is patched would
    # bind the mocks for good (``from medrl.io import read_table`` at its top)
    modules = {m: importlib.import_module(m) for m in imports}
    for mod_name, names in imports.items():
        mod = modules[mod_name]
        for name in names:
            if callable(getattr(mod, name)):
                monkeypatch.setattr(mod, name, MagicMock(name=f"{mod_name}.{name}"))
    import medrl.metrics.rlcf_modes as rm

    rm.compare_rlcf_modes.return_value = (MagicMock(), MagicMock())
    import transformers

    monkeypatch.setattr(transformers, "CLIPTokenizer", MagicMock())


_BRANCHES = {  # the other side of every params-dependent branch in graph.py
    "isic": {"source": "real"}, "cxr": {"source": "real"},
    "models": {"isic": {"pretrained": "x"}, "cxr": {"pretrained": "x"}},
    "classifiers": {"diag": {"weights": "x"}, "dualenc": {"checkpoint": "x"}},
}


def _jobs(params):
    for s in STAGES.values():
        for wildcards in jobs_of(s, params):
            yield s, wildcards


def _ctx(s, params, wildcards, view, tmp_path) -> Ctx:
    deps, outs, expanded = stage_paths(s, params, wildcards)
    return Ctx(params=view, deps={k: tmp_path / p for k, p in deps.items()},
               outs={k: tmp_path / p for k, p in outs.items()}, wildcards=wildcards, ckpt=tmp_path / "ckpt",
               device="cpu", log=lambda m, step=None: None, log_artifact=lambda p: None, workspace=tmp_path,
               expanded={k: [(wc, tmp_path / p) for wc, p in ps] for k, ps in expanded.items()})


@pytest.mark.parametrize("config", ["default", "branches"])
def test_every_stage_reads_only_declared_params(config, stubbed_library, tmp_path):
    params = validate_params(small_params(_BRANCHES if config == "branches" else None), check_paths=False)
    RecordingView.reads = set()
    for s, wildcards in _jobs(params):
        view = stage_params(s, params, wildcards)
        view = RecordingView(params, view._stage, view._keys)
        s.run(_ctx(s, params, wildcards, view, tmp_path))  # raises UndeclaredParamError on a read outside s.params


def test_every_declared_param_is_read(stubbed_library, tmp_path):
    """The reverse: a declared key no configuration reads makes needless reruns (or is a typo)."""
    unread = {}
    per_stage: dict[str, set[str]] = {}
    for config in (None, _BRANCHES):
        params = validate_params(small_params(config), check_paths=False)
        for s, wildcards in _jobs(params):
            keys = stage_params(s, params, wildcards)._keys
            RecordingView.reads = set()
            s.run(_ctx(s, params, wildcards, RecordingView(params, s.name, keys), tmp_path))
            variant = wildcards.get("variant")
            per_stage.setdefault(s.name, set()).update(
                t.replace(f".{variant}", ".{variant}") if variant else t for t in RecordingView.reads)
    for s in STAGES.values():
        missing = [k for k in s.params if not any(r == k or r.startswith(k + ".") for r in per_stage[s.name])]
        if missing:
            unread[s.name] = missing
    assert not unread, f"declared but never read: {unread}"


@pytest.mark.parametrize("name, wildcards", [("rl_isic", {"seed": "2"}), ("rl_cxr", {"variant": "no_ace", "seed": "1"})])
def test_seed_wildcard_reaches_the_trainer(name, wildcards, stubbed_library, tmp_path, monkeypatch):
    """An RL job trains with the seed of its {seed} wildcard (rl.seeds), not rl.<track>.seed."""
    import medrl.rl.trainer as trainer

    monkeypatch.setattr(trainer, "DDPOConfig", REAL_DDPO_CONFIG)  # the real config; train_ddpo stays stubbed
    params = validate_params(small_params({"rl": {"isic": {"seed": 0}, "cxr": {"seed": 0}}}), check_paths=False)
    assert wildcards in jobs_of(STAGES[name], params)  # a job of all_seeds (rl.seeds = 0, 1, 2)
    STAGES[name].run(_ctx(STAGES[name], params, wildcards, stage_params(STAGES[name], params, wildcards), tmp_path))
    cfg = trainer.train_ddpo.call_args.kwargs["cfg"]
    assert cfg.seed == int(wildcards["seed"])
    if "variant" in wildcards:
        assert cfg.use_ace == params.rl.cxr.variants[wildcards["variant"]].ace


# ============================================================================= (d) issue 21: independent CXR evaluators

_NETS = {  # reward stage -> (its evaluator stage, trainer, width kwarg, width key of the reward / of cxr_eval)
    "posture_cxr": ("posture_cxr_eval", "medrl.models.posture.train_posture_aligner", "width",
                    "posture.width", "posture_width"),
    "diag_cxr": ("diag_cxr_eval", "medrl.models.xrv_diag.train_diag", "growth_rate", "diag.growth_rate",
                 "diag_growth_rate"),
    "dualenc_cxr": ("dualenc_cxr_eval", "medrl.models.dual_encoder.train_dual_encoder", "embed_dim",
                    "dualenc.embed_dim", "dualenc_embed_dim"),
}


@pytest.mark.parametrize("reward_stage", list(_NETS))
def test_cxr_evaluator_never_trains_on_the_reward_nets_images(reward_stage, stubbed_library, tmp_path, monkeypatch):
    """Each CXR reward net and its evaluator: disjoint training images that together are all the
    train pairs, both evaluated on every test pair, another seed (+ seed_offset) and another width."""
    import pandas as pd

    import medrl.io as mio
    import medrl.models.training as tr

    pairs = pd.DataFrame({"image": [f"p{i:04d}" for i in range(80)], "path": [f"img/{i}.png" for i in range(80)],
                          "split": ["train"] * 64 + ["test"] * 16, "impression": ["no finding"] * 80})
    monkeypatch.setattr(mio, "read_table", lambda *a, **k: pairs.copy())
    monkeypatch.setattr(tr, "judge_pairs", REAL_JUDGE_PAIRS)
    params = validate_params(small_params(), check_paths=False)
    eval_stage, trainer, width_kw, reward_width, eval_width = _NETS[reward_stage]
    mod_name, fn = trainer.rsplit(".", 1)
    calls = {}
    for name in (reward_stage, eval_stage):
        mock = MagicMock(name=trainer)
        monkeypatch.setattr(importlib.import_module(mod_name), fn, mock)
        STAGES[name].run(_ctx(STAGES[name], params, {}, stage_params(STAGES[name], params, {}), tmp_path))
        (got,), kw = mock.call_args.args[:1], mock.call_args.kwargs
        calls[name] = (got, kw)
    train = {n: set(got.loc[got.split == "train", "image"]) for n, (got, _) in calls.items()}
    assert train[reward_stage] and train[eval_stage], train
    assert not train[reward_stage] & train[eval_stage], "an evaluator trains on a reward net's image"
    assert train[reward_stage] | train[eval_stage] == set(pairs.loc[pairs.split == "train", "image"])
    for got, _ in calls.values():
        assert set(got.loc[got.split == "test", "image"]) == set(pairs.loc[pairs.split == "test", "image"])
    k, e = params.classifiers, params.classifiers.cxr_eval
    (_, kr), (_, ke) = calls[reward_stage], calls[eval_stage]
    section, leaf = reward_width.split(".")
    assert ke["seed"] == kr["seed"] + e.seed_offset != kr["seed"]
    assert kr[width_kw] == getattr(getattr(k, section), leaf) and ke[width_kw] == getattr(e, eval_width)
    assert ke[width_kw] != kr[width_kw]


def test_cxr_judge_split_is_by_image_id_alone():
    """The judge of an image does not depend on row order, the other rows or the dataset size."""
    from medrl.models.training import judge_split

    ids = [f"x{i}" for i in range(400)]
    split = dict(zip(ids, judge_split(ids, 0.5)))
    assert dict(zip(ids[::-1], judge_split(ids[::-1], 0.5))) == split
    assert dict(zip(ids[:50], judge_split(ids[:50], 0.5))) == {i: split[i] for i in ids[:50]}
    assert 0.4 < sum(v == "reward" for v in split.values()) / len(ids) < 0.6
    assert sum(v == "reward" for v in judge_split(ids, 0.8)) > sum(v == "reward" for v in split.values())
