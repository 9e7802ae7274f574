"""The stage graph is defined once (workflow/graph.py) and both engines agree on it.

(a) drift: dvc.yaml / workflow/rules/*.smk are exactly what workflow/export.py generates;
(b) DVC (parsing dvc.yaml itself) and Snakemake (building the DAG of `all_seeds`) list the same
    stages with the same commands, deps, outs and params keys; `all` runs one RL seed, `all_seeds`
    every seed of rl.seeds for ISIC and the headline CXR variants;
(c) a one-parameter change re-runs exactly the stages downstream of it, under both engines,
    with the cheap data stages run for real in a small workspace.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medrl_testutil import (CHEAP_STAGES, CHEAP_TARGETS, REPO, VENV_BIN, dvc_stages, dvc_status, engine_env,
                            make_workspace, mlflow_stage_runs, run, set_param, snakemake_jobs, snakemake_planned)

sys.path.insert(0, str(REPO / "workflow"))
from graph import STAGES, jobs_of  # noqa: E402
from state import job_name  # noqa: E402

pytestmark = pytest.mark.timeout(900)  # (c) runs real stages under both engines: minutes on 2 busy cores

DVC = str(VENV_BIN / "dvc")
SNAKEMAKE = str(VENV_BIN / "snakemake")
# what `snakemake -n` is asked to consider (no code/software-env triggers); nargs="+", so it
# must come after the targets on the command line
TRIGGERS = ("--rerun-triggers", "params", "mtime", "input")


# ============================================================================= resumable state


def test_checkpoint_dir_is_keyed_by_params_and_inputs(tmp_path):
    """A stage killed and rerun unchanged finds its checkpoint; one rerun after its params or an
    input changed starts afresh (the stale state is pruned), instead of resuming it."""
    import os

    from entry import checkpoint_dir

    dep = tmp_path / "data" / "prepared"
    dep.mkdir(parents=True)
    (dep / "a.csv").write_text("x\n1\n")
    root = tmp_path / "data" / ".ckpt" / "rl_cxr-full"
    params = {"rl.cxr.rlcf_mode": "bank", "rl.cxr.epochs": 16}
    first = checkpoint_dir(root, params, [dep], prune=True)
    (first / "state.json").write_text("{}")
    assert checkpoint_dir(root, dict(params), [dep], prune=True) == first and (first / "state.json").is_file()
    worker = checkpoint_dir(root, params, [dep], prune=False)  # another process of the same launch
    assert worker == first
    other = checkpoint_dir(root, {**params, "rl.cxr.rlcf_mode": "paired"}, [dep], prune=True)
    assert other != first and not first.exists() and list(root.iterdir()) == [other]
    st = (dep / "a.csv").stat()
    os.utime(dep / "a.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input was rewritten
    assert checkpoint_dir(root, {**params, "rl.cxr.rlcf_mode": "paired"}, [dep], prune=True) != other


# ============================================================================= (a) drift


def _export(root: Path, *args: str):
    return run([sys.executable, str(root / "workflow" / "export.py"), *args], root, check=False, timeout=60)


def test_generated_files_match_graph():
    proc = _export(REPO, "--check")
    assert proc.returncode == 0, f"dvc.yaml / rules drifted from workflow/graph.py:\n{proc.stdout}\n{proc.stderr}"


def test_snakefile_includes_every_generated_rules_file():
    """A stage of a new track gets its own workflow/rules/<track>.smk: the Snakefile must include it
    (and nothing that is no longer generated), or Snakemake silently lacks its rules."""
    from export import generated

    rules = {rel for rel in generated() if rel.startswith("workflow/rules/")}
    snakefile = (REPO / "Snakefile").read_text()
    included = set(re.findall(r'^include: "(workflow/rules/[^"]+)"', snakefile, flags=re.M))
    assert included - {"workflow/rules/common.smk"} == rules


@pytest.mark.parametrize("victim, edit", [
    ("dvc.yaml", lambda t: t.replace("cmd: python workflow/entry.py prepare_isic",
                                     "cmd: python workflow/entry.py prepare_isic --fast")),
    ("dvc.yaml", lambda t: t.replace("    - isic.prepare\n", "", 1)),
    ("workflow/rules/cxr.smk", lambda t: t.replace("prepared=directory('data/prepared/cxr')",
                                                   "prepared=directory('data/prepared/cxr2')")),
])
def test_drift_is_detected(tmp_path, victim, edit):
    for rel in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / rel, tmp_path / rel)
    shutil.copytree(REPO / "workflow", tmp_path / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    assert _export(tmp_path, "--check").returncode == 0  # the copy itself is clean
    text = (tmp_path / victim).read_text()
    edited = edit(text)
    assert edited != text, "the edit did not apply: update this test to the generated text"
    (tmp_path / victim).write_text(edited)
    proc = _export(tmp_path, "--check")
    assert proc.returncode == 1
    assert victim in proc.stdout and "drifted" in proc.stderr
    # regenerating repairs it
    assert _export(tmp_path).returncode == 0
    assert (tmp_path / victim).read_text() == text
    assert _export(tmp_path, "--check").returncode == 0


def test_cxr_metrics_read_both_judges_and_rl_only_the_reward():
    """Issue 21: the CXR metrics stages score with the reward nets and with the independent
    evaluators (*_cxr_eval); nothing that trains or steers RL reads an evaluator."""
    evaluators = {STAGES[f"{n}_cxr_eval"].outs["model"] for n in ("posture", "diag", "dualenc")}
    rewards = {STAGES[f"{n}_cxr"].outs["model"] for n in ("posture", "diag", "dualenc")}
    assert evaluators.isdisjoint(rewards) and len(evaluators) == 3
    for name in ("metrics_cxr", "metrics_cxr_anchor"):
        deps = set(STAGES[name].deps.values())
        assert evaluators <= deps and rewards <= deps, name
    for s in STAGES.values():
        if s.name.startswith(("rl_", "anchor_bank", "rlcf_modes")):
            assert evaluators.isdisjoint(s.deps.values()), s.name


@pytest.mark.parametrize("track, override, lr, text", [
    ("isic", {}, 2e-3, True),  # models.finetune_base's values
    ("cxr", {"finetune_lr": 5e-4, "train_text_encoder": False}, 5e-4, False),  # the track's own
])
def test_base_finetune_takes_the_track_overrides(track, override, lr, text, monkeypatch, tmp_path):
    """models.<track>.finetune_lr / train_text_encoder override models.finetune_base for one track,
    and the stage declares them (a change reruns only that track's base)."""
    import medrl.diffusion.finetune as ft
    from graph import Ctx, stage_params
    from medrl.config import validate_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["models"]["finetune_base"].update(lr=2e-3, train_text_encoder=True)
    raw["models"]["isic"].update(finetune_lr=None, train_text_encoder=None)
    raw["models"][track].update(override)
    got = {}
    monkeypatch.setattr(ft, "finetune_base", lambda *a, **kw: got.update(kw) or {})
    stage = STAGES[f"finetune_base_{track}"]
    assert {f"models.{track}.finetune_lr", f"models.{track}.train_text_encoder"} <= set(stage.params)
    ctx = Ctx(params=stage_params(stage, validate_params(raw, check_paths=False), {}), deps={"stack": tmp_path,
              "latents": tmp_path}, outs={"base": tmp_path}, wildcards={}, ckpt=tmp_path, device="cpu",
              log=lambda m, s=None: None, log_artifact=lambda p: None, workspace=tmp_path)
    stage.run(ctx)
    assert got["lr"] == lr and got["train_text_encoder"] is text


@pytest.mark.parametrize("heads", ["h6", "h4"])
def test_the_isic_evaluator_has_its_own_budget(heads, monkeypatch, tmp_path):
    """classifiers.isic_eval's epochs / batch size train the H=4 evaluator only: the H=6 reward keeps
    classifiers.isic's and does not declare isic_eval, so a longer-trained judge leaves the reward as it is."""
    import medrl.models.classifiers as mc
    from graph import Ctx, stage_params
    from medrl.config import validate_params
    from medrl.data.prompts import HEADS6

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["classifiers"]["isic"].update(epochs=3, batch_size=5, roundtrip=False)
    raw["classifiers"]["isic_eval"].update(epochs=7, batch_size=2)
    (tmp_path / "prepared").mkdir()
    pd.DataFrame([{"path": "x.png", "split": "train", **{h: 0 for h in HEADS6}}]).to_csv(
        tmp_path / "prepared" / "items.csv", index=False)
    got = {}
    monkeypatch.setattr(mc, "train_classifier", lambda *a, **kw: got.update(kw) or {})
    stage = STAGES[f"classifier_isic_{heads}"]
    assert ("classifiers.isic_eval" in stage.params) is (heads == "h4")
    assert ("classifiers.isic" in stage.params) is (heads == "h6")  # H=4 declares only the leaves it reads
    ctx = Ctx(params=stage_params(stage, validate_params(raw, check_paths=False), {}),
              deps={"prepared": tmp_path / "prepared", "stack": tmp_path}, outs={"clf": tmp_path / "clf"},
              wildcards={}, ckpt=tmp_path, device="cpu", log=lambda m, s=None: None, log_artifact=lambda p: None,
              workspace=tmp_path)
    stage.run(ctx)
    assert (got["epochs"], got["batch_size"]) == ((7, 2) if heads == "h4" else (3, 5))
    assert got["train_split"] == ("cls_b" if heads == "h4" else "train")


@pytest.mark.parametrize("variant, reps", [("full", 1), ("repeated", 8)])
def test_a_variant_may_set_its_own_prompt_repeats(variant, reps, monkeypatch, tmp_path):
    """rl.cxr.variants.<v>.prompt_repeats (the repeated-reports setting) reaches the trainer; the
    other variants keep rl.cxr's i.i.d. reports."""
    import medrl.rewards.cxr as rc
    import medrl.rl.trainer as tr
    import pandas as pd
    from graph import Ctx, stage_params
    from medrl.config import validate_params
    from medrl.data.reports import PATHOLOGIES

    got = {}
    monkeypatch.setattr(tr, "train_ddpo", lambda *a, cfg, **kw: got.update(cfg=cfg) or {})
    monkeypatch.setattr(rc, "CXRReward", lambda *a, **kw: None)
    (tmp_path / "prepared").mkdir()
    pd.DataFrame({"image": ["a"], "path": ["a.png"], "split": ["train"], "impression": ["No finding."],
                  **{c: [float("nan")] for c in PATHOLOGIES}}
                 ).to_csv(tmp_path / "prepared" / "pairs.csv", index=False)
    params = validate_params(yaml.safe_load((REPO / "params.yaml").read_text()), check_paths=False)
    stage, wc = STAGES["rl_cxr"], {"variant": variant, "seed": "0"}
    deps = {k: tmp_path / k for k in stage.deps}
    ctx = Ctx(params=stage_params(stage, params, wc), deps=deps, outs={"rl": tmp_path / "rl"}, wildcards=wc,
              ckpt=tmp_path, device="cpu", log=lambda m, s=None: None, log_artifact=lambda p: None, workspace=tmp_path)
    stage.run(ctx)
    assert got["cfg"].prompt_repeats == reps


# ============================================================================= (b) both engines agree


def _expected_names(params: dict) -> set[str]:
    return {job_name(s.name, wc) for s in STAGES.values() for wc in jobs_of(s, params)}


@pytest.fixture(scope="module")
def full_workspace(tmp_path_factory) -> Path:
    """The repository's own params.yaml (not the small one) in a workspace."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return make_workspace(tmp_path_factory.mktemp("full"), raw)


def test_engines_list_the_same_stages(full_workspace):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    variants = list(raw["rl"]["cxr"]["variants"])
    dvc = dvc_stages(full_workspace)
    smk = snakemake_jobs(full_workspace, target="all_seeds")
    expected = _expected_names(raw)
    assert set(dvc) == expected, f"DVC: missing {expected - set(dvc)}, extra {set(dvc) - expected}"
    assert set(smk) == expected, f"Snakemake: missing {expected - set(smk)}, extra {set(smk) - expected}"
    for name in sorted(expected):
        d, s = dvc[name], smk[name]
        # Snakemake also reads the stage's params file (DVC reads params.yaml itself)
        assert s["deps"].count(f"data/.params/{name}.json") == 1, s["deps"]
        s = {**s, "deps": [p for p in s["deps"] if not p.startswith("data/.params/")]}
        for field in ("cmd", "deps", "outs", "params"):
            assert d[field] == s[field], f"{name}: {field} differs\n  DVC:       {d[field]}\n  Snakemake: {s[field]}"
        stage = STAGES[name.split("@")[0]]
        assert job_name(stage.name, s["wildcards"]) == name and set(s["wildcards"]) == set(stage.wildcards)
        # GPU-heavy stages ask for a GPU (MEDRL_GPUS_PER_JOB defaults to 1), the others do not
        assert ("gpu" in s["resources"]) == stage.gpu, f"{name}: gpu resource {s['resources']}"
        launcher = "accelerate launch" if stage.accelerate else "python"
        assert d["cmd"].startswith(f"{launcher} workflow/entry.py {stage.name}")
        # the aggregate depends on every variant's default-seed output (+ the anchor and the RLCF-mode comparison)
        if stage.name == "tables_cxr":
            seed = raw["rl"]["cxr"]["seed"]
            assert {f"data/metrics/cxr/{v}/seed_{seed}" for v in variants} <= set(d["deps"])
            assert sum(1 for p in d["deps"] if p.startswith("data/metrics/cxr/")) == len(variants) + 2
        if stage.name == "tables_cxr_seeds":
            assert sorted(d["deps"]) == sorted(["data/metrics/cxr/anchor"] + [
                f"data/metrics/cxr/{v}/seed_{x}" for v in raw["rl"]["cxr"]["seed_variants"] for x in raw["rl"]["seeds"]])


def test_all_runs_one_seed_and_all_seeds_every_seed(full_workspace):
    """`all` trains one RL run per model (rl.<track>.seed); `all_seeds` one per seed of rl.seeds
    for ISIC and the headline CXR variants, the other variants still once."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    one = snakemake_jobs(full_workspace)
    assert {n for n in one if n.startswith("rl_")} == {f"rl_isic@s{raw['rl']['isic']['seed']}"} | {
        f"rl_cxr@{v}-s{raw['rl']['cxr']['seed']}" for v in raw["rl"]["cxr"]["variants"]}
    assert "tables_isic_seeds" not in one and "tables_cxr_seeds" not in one
    assert {"tables_isic", "tables_cxr", "summary"} <= set(one)  # the summary of both tracks' claims
    every = snakemake_jobs(full_workspace, target="all_seeds")
    assert set(one) < set(every) and {"tables_isic_seeds", "tables_cxr_seeds"} <= set(every)
    rl_runs = Counter(every[n]["wildcards"].get("variant", "isic") for n in every if n.startswith("rl_"))
    headline = {"isic", *raw["rl"]["cxr"]["seed_variants"]}
    assert rl_runs == {m: len(set(raw["rl"]["seeds"]) | {raw["rl"]["cxr"]["seed"]}) if m in headline else 1
                       for m in ["isic", *raw["rl"]["cxr"]["variants"]]}


def test_engine_clis_list_the_same_stage_names(full_workspace):
    names = run([DVC, "stage", "list", "--all", "--name-only"], full_workspace).stdout.split()
    # one rule per line: "name (first docstring line)"
    rules = [line.split()[0] for line in run([SNAKEMAKE, "--list-rules"], full_workspace).stdout.splitlines()
             if line.strip()]
    assert {n.split("@")[0] for n in names} == set(rules) - {"all", "all_seeds"} == set(STAGES)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert Counter(n.split("@")[0] for n in names)["rl_cxr"] == len(jobs_of(STAGES["rl_cxr"], raw)) == len(
        raw["rl"]["cxr"]["variants"]) + len(raw["rl"]["cxr"]["seed_variants"]) * (len(raw["rl"]["seeds"]) - 1)


def test_dry_run_all_seeds_on_the_small_config(workspace_factory):
    """`snakemake -n all_seeds` in a small workspace plans three RL runs (and their samples and
    metrics) per headline model, one per other variant, and both tables over seeds."""
    ws = workspace_factory("dry", dvc=False)
    planned = snakemake_planned(ws, ["all_seeds"])
    for stage, models in (("rl_isic", [""]), ("generate_rl_isic", [""]), ("metrics_isic_rl", [""]),
                          ("rl_cxr", ["full-", "no_ace-", "no_rlcf-"]), ("generate_cxr", ["full-"]),
                          ("metrics_cxr", ["no_rlcf-"])):
        for m in models:
            assert {n for n in planned if n.startswith(f"{stage}@{m}s")} == {f"{stage}@{m}s{x}" for x in (0, 1, 2)}
    assert [n for n in planned if n.startswith("rl_cxr@align_only")] == ["rl_cxr@align_only-s0"]
    assert {"tables_isic", "tables_cxr", "tables_isic_seeds", "tables_cxr_seeds"} <= set(planned)
    default = snakemake_planned(ws, ["all"])
    assert [n for n in default if n.startswith("rl_isic")] == ["rl_isic@s0"]
    assert not {"tables_isic_seeds", "tables_cxr_seeds"} & set(default)


def test_gpu_resources_follow_env(full_workspace):
    cpu = snakemake_jobs(full_workspace, env=engine_env(MEDRL_GPUS_PER_JOB="0"))
    assert not any("gpu" in j["resources"] for j in cpu.values())
    two = snakemake_jobs(full_workspace, env=engine_env(MEDRL_GPUS_PER_JOB="2", MEDRL_GPU_MODEL="a100"))
    gpu_jobs = {n for n, j in two.items() if j["resources"].get("gpu") == 2}
    assert gpu_jobs == {n for n in two if STAGES[n.split("@")[0]].gpu}
    assert all(two[n]["resources"].get("gpu_model") == "a100" for n in gpu_jobs)


# ============================================================================= (c) one parameter, exact reruns


def _finished_runs(ws: Path) -> Counter:
    runs = mlflow_stage_runs(f"sqlite:///{ws / 'mlflow.db'}")
    return Counter(r.data.tags["medrl.stage"] for r in runs if r.info.status == "FINISHED")


def _ran(dvc_stdout: str) -> set[str]:
    return {line.split("'")[1] for line in dvc_stdout.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def dvc_ws(workspace_factory) -> Path:
    ws = workspace_factory("dvc")
    run([DVC, "repro", *CHEAP_STAGES], ws, timeout=600)
    return ws


@pytest.fixture(scope="module")
def smk_ws(workspace_factory) -> Path:
    ws = workspace_factory("smk", dvc=False)
    run([SNAKEMAKE, "--cores", "1", *CHEAP_TARGETS], ws, timeout=600)
    return ws


def _dvc_up_to_date(ws: Path) -> None:
    run([DVC, "repro", *CHEAP_STAGES], ws, timeout=600)
    assert dvc_status(ws, list(CHEAP_STAGES)) == {}


@pytest.mark.slow
def test_dvc_initial_run(dvc_ws):
    for t in CHEAP_TARGETS:
        assert (dvc_ws / t).is_dir() and any((dvc_ws / t).iterdir()), t
    assert dvc_status(dvc_ws, list(CHEAP_STAGES)) == {}
    lock = yaml.safe_load((dvc_ws / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(CHEAP_STAGES)
    assert lock["prepare_isic"]["params"]["params.yaml"]["isic.prepare"]["seed"] == 0
    # every stage execution is an MLflow run with input and output hashes
    assert _finished_runs(dvc_ws) == Counter({s: 1 for s in CHEAP_STAGES})


@pytest.mark.slow
def test_dvc_leaf_param_change_reruns_only_that_stage(dvc_ws):
    _dvc_up_to_date(dvc_ws)
    before = _finished_runs(dvc_ws)
    set_param(dvc_ws / "params.yaml", "isic.prepare.seed", 7)
    status = dvc_status(dvc_ws, list(CHEAP_STAGES))
    assert set(status) == {"prepare_isic"}, status
    # DVC names the declared params key (the isic.prepare section)
    assert status["prepare_isic"] == [{"changed deps": {"params.yaml": {"isic.prepare": "modified"}}}]
    proc = run([DVC, "repro", *CHEAP_STAGES], dvc_ws, timeout=600)
    assert _ran(proc.stdout) == {"prepare_isic"}, proc.stdout
    assert dvc_status(dvc_ws, list(CHEAP_STAGES)) == {}
    assert _finished_runs(dvc_ws) - before == Counter({"prepare_isic": 1})


@pytest.mark.slow
def test_dvc_upstream_param_change_reruns_downstream(dvc_ws):
    _dvc_up_to_date(dvc_ws)
    set_param(dvc_ws / "params.yaml", "cxr.phantom.seed", 11)
    # DVC reports the stage whose params changed; its dependants change once it has rerun
    assert set(dvc_status(dvc_ws, list(CHEAP_STAGES))) == {"download_cxr"}
    proc = run([DVC, "repro", *CHEAP_STAGES], dvc_ws, timeout=600)
    assert _ran(proc.stdout) == {"download_cxr", "tokenizer_cxr", "prepare_cxr"}, proc.stdout
    assert dvc_status(dvc_ws, list(CHEAP_STAGES)) == {}


@pytest.mark.slow
def test_dvc_unrelated_param_change_reruns_nothing(dvc_ws):
    _dvc_up_to_date(dvc_ws)
    set_param(dvc_ws / "params.yaml", "rl.isic.epochs", 3)  # only rl_isic declares it
    assert dvc_status(dvc_ws, list(CHEAP_STAGES)) == {}
    proc = run([DVC, "repro", *CHEAP_STAGES], dvc_ws, timeout=600)
    assert _ran(proc.stdout) == set(), proc.stdout


@pytest.mark.slow
def test_snakemake_initial_run(smk_ws):
    for t in CHEAP_TARGETS:
        assert (smk_ws / t).is_dir() and any((smk_ws / t).iterdir()), t
    assert snakemake_planned(smk_ws, list(CHEAP_TARGETS), *TRIGGERS) == {}
    assert _finished_runs(smk_ws) == Counter({s: 1 for s in CHEAP_STAGES})


@pytest.mark.slow
def test_snakemake_leaf_param_change_reruns_only_that_stage(smk_ws):
    run([SNAKEMAKE, "--cores", "1", *CHEAP_TARGETS], smk_ws, timeout=600)
    before = _finished_runs(smk_ws)
    set_param(smk_ws / "params.yaml", "isic.prepare.seed", 7)
    planned = snakemake_planned(smk_ws, list(CHEAP_TARGETS), *TRIGGERS)
    assert set(planned) == {"prepare_isic"}, planned
    # the stage's params file, rewritten with the new value, is what triggered it
    assert planned["prepare_isic"] == "Updated input files: data/.params/prepare_isic.json", planned
    # Snakemake's updated-input check alone is enough (its params trigger has nothing to see)
    assert set(snakemake_planned(smk_ws, list(CHEAP_TARGETS), "--rerun-triggers", "mtime")) == {"prepare_isic"}
    run([SNAKEMAKE, "--cores", "1", *CHEAP_TARGETS, *TRIGGERS], smk_ws, timeout=600)
    assert _finished_runs(smk_ws) - before == Counter({"prepare_isic": 1})
    assert snakemake_planned(smk_ws, list(CHEAP_TARGETS), *TRIGGERS) == {}


@pytest.mark.slow
def test_snakemake_upstream_param_change_plans_downstream(smk_ws):
    run([SNAKEMAKE, "--cores", "1", *CHEAP_TARGETS, *TRIGGERS], smk_ws, timeout=600)
    set_param(smk_ws / "params.yaml", "cxr.phantom.seed", 11)
    planned = snakemake_planned(smk_ws, list(CHEAP_TARGETS), *TRIGGERS)
    assert set(planned) == {"download_cxr", "tokenizer_cxr", "prepare_cxr"}, planned


@pytest.mark.slow
def test_snakemake_unrelated_param_change_plans_nothing(smk_ws):
    set_param(smk_ws / "params.yaml", "cxr.phantom.seed", 1)  # back to what ran
    set_param(smk_ws / "params.yaml", "rl.isic.epochs", 3)
    assert snakemake_planned(smk_ws, list(CHEAP_TARGETS), *TRIGGERS) == {}


@pytest.mark.slow
def test_both_engines_record_the_same_lineage_shape(dvc_ws, smk_ws):
    """Whichever engine ran a stage, its MLflow run names the same input and output paths."""
    def shapes(ws):
        out = {}
        for r in mlflow_stage_runs(f"sqlite:///{ws / 'mlflow.db'}"):
            t = r.data.tags
            out[t["medrl.stage"]] = (sorted(json.loads(t["medrl.inputs"])), sorted(json.loads(t["medrl.outputs"])))
        return out

    assert shapes(dvc_ws) == shapes(smk_ws)
    assert shapes(dvc_ws)["prepare_cxr"] == (["data/datasets/cxr", "data/models/cxr/tokenizer"], ["data/prepared/cxr"])
