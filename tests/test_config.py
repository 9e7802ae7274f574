"""params.yaml validation: bad keys fail with a ParamsError naming the dotted key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medrl.config import Params, load_params, select, validate_params
from medrl.errors import ParamsError
from medrl_testutil import REPO, small_params


def _raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_validate():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    # the file sets every section explicitly (the schema defaults are not silently relied on)
    assert set(_raw()) == set(Params.model_fields)


def test_small_params_validate_and_shrink():
    small = validate_params(small_params(), source="params_small")
    full = load_params(REPO / "params.yaml")
    assert small.isic.phantom.n_images < full.isic.phantom.n_images
    assert small.run.num_threads == 1
    # the overlay keeps the variants, so the workspace's dvc.yaml equals the repository's
    assert list(small.rl.cxr.variants) == list(full.rl.cxr.variants)


@pytest.mark.parametrize("path, value, key", [
    (("isic", "prepare", "sede"), 1, "isic.prepare.sede"),  # typo of a leaf
    (("rl", "cxr", "variants", "full", "l_algn"), 1.0, "rl.cxr.variants.full.l_algn"),  # inside a mapping
    (("metrics", "extra_section"), {"a": 1}, "metrics.extra_section"),
])
def test_unknown_key_is_named(path, value, key):
    raw = _raw()
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=rf"unknown key '{key}'"):
        validate_params(raw)


@pytest.mark.parametrize("path, value, key", [
    (("isic", "phantom", "n_images"), "many", "isic.phantom.n_images"),
    (("rl", "common", "lr"), [0.1], "rl.common.lr"),
    (("run", "device"), "tpu", "run.device"),  # not one of auto/cpu/cuda
    (("cxr", "prepare", "n_test"), 1, "cxr.prepare.n_test"),  # below its minimum
    (("rl", "cxr", "variants", "no_ace", "ace"), "sometimes", "rl.cxr.variants.no_ace.ace"),
])
def test_wrong_type_is_named(path, value, key):
    raw = _raw()
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    assert f"key '{key}'" in str(e.value)
    assert repr(value) in str(e.value)  # the offending value is shown


def test_missing_path_is_named(tmp_path):
    raw = _raw()
    missing = tmp_path / "no" / "such" / "weights.safetensors"
    raw["classifiers"]["diag"]["weights"] = str(missing)
    with pytest.raises(ParamsError, match=r"key 'classifiers\.diag\.weights': path .* does not exist"):
        validate_params(raw)
    # the same file once it exists passes
    missing.parent.mkdir(parents=True)
    missing.write_bytes(b"")
    assert validate_params(raw).classifiers.diag.weights == str(missing)


def test_bad_variant_name_is_named():
    raw = _raw()
    raw["rl"]["cxr"]["variants"]["anchor"] = dict(raw["rl"]["cxr"]["variants"]["full"])
    with pytest.raises(ParamsError, match=r"key 'rl\.cxr\.variants'"):
        validate_params(raw)


def test_prompt_repeats_must_divide_batch():
    raw = _raw()
    raw["rl"]["common"]["prompt_repeats"] = 3
    raw["rl"]["cxr"]["sample_batch_size"] = 9
    with pytest.raises(ParamsError, match=r"'rl\.common\.prompt_repeats': 3 does not divide rl\.isic\.sample_batch_size=32") as e:
        validate_params(raw)
    assert "rl.cxr" not in str(e.value)  # 9 is divisible by 3


def test_skip_last_steps_must_leave_a_trained_step():
    raw = _raw()
    raw["rl"]["common"]["num_steps"] = 4
    raw["rl"]["cxr"]["skip_last_steps"] = 4
    with pytest.raises(ParamsError, match=r"'rl\.cxr\.skip_last_steps': 4 leaves no trained step for rl\.cxr"):
        validate_params(raw)
    raw["rl"]["cxr"]["skip_last_steps"] = None
    raw["rl"]["common"]["skip_last_steps"] = 5
    with pytest.raises(ParamsError, match=r"'rl\.common\.skip_last_steps': 5 leaves no trained step for rl\.isic"):
        validate_params(raw)


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(top)
    twice = tmp_path / "twice.yaml"  # PyYAML would keep the last value silently
    twice.write_text("run:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ParamsError, match=r"'seed' appears twice.*line 3"):
        load_params(twice)


def test_select_names_unknown_key():
    params = load_params(REPO / "params.yaml")
    assert select(params, ["isic.prepare.seed"]) == {"isic.prepare.seed": params.isic.prepare.seed}
    with pytest.raises(ParamsError, match="no key 'isic.prepare.nope'"):
        select(params, ["isic.prepare.nope"])


def test_cli_params_check(tmp_path):
    medrl = Path(sys.executable).parent / "medrl"
    ok = subprocess.run([str(medrl), "params-check", str(REPO / "params.yaml")], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    raw = _raw()
    raw["generate"]["isic"]["n_per_promt"] = 3
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([str(medrl), "params-check", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'generate.isic.n_per_promt'" in proc.stderr


def test_track_lr_overrides_common():
    """rl.<track>.lr (null = rl.common.lr) reaches the trainer's config through the stage."""
    import sys

    sys.path.insert(0, str(REPO / "workflow"))
    from graph import _ddpo_config

    raw = _raw()
    raw["rl"]["isic"]["lr"], raw["rl"]["cxr"]["lr"] = 0.02, None
    params = validate_params(raw)
    ctx = type("Ctx", (), {"params": params, "wildcards": {"seed": "0"}})()
    assert _ddpo_config(ctx, "isic").lr == 0.02
    assert _ddpo_config(ctx, "cxr").lr == params.rl.common.lr
    # kl_coef, clip_range and skip_last_steps: a track's value overrides rl.common's, null keeps it
    raw["rl"]["common"]["kl_coef"], raw["rl"]["cxr"]["kl_coef"] = 0.5, 0.03
    raw["rl"]["common"]["clip_range"], raw["rl"]["isic"]["clip_range"] = 0.2, 1e-3
    raw["rl"]["common"]["skip_last_steps"], raw["rl"]["cxr"]["skip_last_steps"] = 1, None
    params = validate_params(raw)
    ctx = type("Ctx", (), {"params": params, "wildcards": {"seed": "0"}})()
    assert (_ddpo_config(ctx, "isic").kl_coef, _ddpo_config(ctx, "cxr").kl_coef) == (0.5, 0.03)
    assert (_ddpo_config(ctx, "isic").skip_last_steps, _ddpo_config(ctx, "cxr").skip_last_steps) == (1, 1)
    assert (_ddpo_config(ctx, "isic").clip_range, _ddpo_config(ctx, "cxr").clip_range) == (1e-3, 0.2)
    raw["rl"]["isic"]["lr"] = 0
    with pytest.raises(ParamsError, match=r"rl\.isic\.lr"):
        validate_params(raw)


# Issue 17, item 6: the schema is strict. Each value was accepted (coerced or in range) before.
_LOOSE = [
    ("classifiers.isic.epochs", True),  # bool for an int
    ("classifiers.isic.epochs", "5"),  # string for an int
    ("classifiers.isic.epochs", 3.0),  # float for an int
    ("isic.real.download", "yes"),  # string for a bool
    ("cxr.real.download", 1),  # int for a bool
    ("rl.common.lr", float("inf")),  # YAML .inf
    ("rl.common.lr", float("nan")),  # YAML .nan
    ("rl.common.lr", "1e-3"),  # what PyYAML makes of 1e-3
    ("rl.common.lr", True),  # bool for a float
    ("models.tiny.layers_per_block", -2),
    ("models.tiny.latent_channels", 0),
    ("models.tiny.text_heads", 0),
    ("models.tiny.block_out_channels", [32, 0]),
    ("models.tiny.vae_block_out_channels", []),
    ("run.seed", -1),
    ("generate.cxr.seed", -5),
    ("isic.real.known_hashes", {"x": "md5:abc"}),
    ("isic.real.known_hashes", {"x": "sha256:" + "a" * 63}),
    ("isic.real.base_url", "file:///etc"),
    ("cxr.real.base_url", "ftp://physionet.org/files"),
    ("cxr.real.base_url", "https://u:p4ssw0rd@physionet.org/files"),
    ("cxr.real.verify_checksums", "no"),
]


@pytest.mark.parametrize("key, value", _LOOSE, ids=[f"{k}={v!r}" for k, v in _LOOSE])
def test_loose_value_is_rejected(key, value, tmp_path):
    raw = _raw()
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    msg = str(e.value)
    assert f"key '{key}" in msg, msg  # the dotted key (or an item below it: known_hashes.x, ...)
    assert "p4ssw0rd" not in msg
    # the same through the command line, from a YAML file
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([str(Path(sys.executable).parent / "medrl"), "params-check", str(bad), "--no-paths"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"key '{key}" in proc.stderr, proc.stderr
    assert "p4ssw0rd" not in proc.stdout + proc.stderr


def test_strict_schema_still_takes_valid_numbers():
    raw = _raw()
    raw["rl"]["common"]["lr"] = 1  # an int where a float is expected
    raw["models"]["vae_train"]["kl_weight"] = 0
    raw["cxr"]["real"]["base_url"] = "http://127.0.0.1:8000/files"
    raw["isic"]["real"]["known_hashes"] = {"ISIC_2019_Training_GroundTruth.csv": "sha256:" + "AB" * 32}
    params = validate_params(raw)
    assert params.rl.common.lr == 1.0 and params.cxr.real.verify_checksums is True


def test_rl_seeds_and_seed_variants_are_checked():
    """rl.seeds: a non-empty list of distinct seeds; rl.cxr.seed_variants: distinct keys of rl.cxr.variants."""
    params = validate_params(_raw())
    assert params.rl.seeds == [0, 1, 2] and params.rl.cxr.seed_variants == ["full", "no_ace", "no_rlcf"]
    for seeds, msg in (([], r"rl\.seeds"), ([0, 0], "repeat a seed"), ([-1], r"rl\.seeds\.0"), (["1"], r"rl\.seeds\.0")):
        raw = _raw()
        raw["rl"]["seeds"] = seeds
        with pytest.raises(ParamsError, match=msg):
            validate_params(raw)
    for sv, msg in ((["full", "nope"], r"rl\.cxr.*'nope'"), (["full", "full"], "repeat a variant")):
        raw = _raw()
        raw["rl"]["cxr"]["seed_variants"] = sv
        with pytest.raises(ParamsError, match=msg):
            validate_params(raw)


def test_cxr_evaluators_are_checked():
    """classifiers.cxr_eval: an evaluator needs another width than its reward net, another seed
    (offset >= 1) and a reward share strictly between 0 and 1."""
    e = validate_params(_raw()).classifiers.cxr_eval
    assert e.seed_offset >= 1 and 0 < e.reward_share < 1
    for section, key, reward in (("posture", "posture_width", "width"), ("diag", "diag_growth_rate", "growth_rate"),
                                 ("dualenc", "dualenc_embed_dim", "embed_dim")):
        raw = _raw()
        raw["classifiers"]["cxr_eval"][key] = raw["classifiers"][section][reward]
        with pytest.raises(ParamsError, match=rf"classifiers.*cxr_eval\.{key}.*equals classifiers\.{section}\.{reward}"):
            validate_params(raw)
    for key, value in (("seed_offset", 0), ("reward_share", 0.0), ("reward_share", 1.0), ("posture_width", 4)):
        raw = _raw()
        raw["classifiers"]["cxr_eval"][key] = value
        with pytest.raises(ParamsError, match=rf"classifiers\.cxr_eval\.{key}"):
            validate_params(raw)


def test_isic_evaluator_budget_is_checked():
    """classifiers.isic_eval: the H=4 evaluator's own epochs and batch size, each at least 1."""
    e = validate_params(_raw()).classifiers.isic_eval
    assert e.epochs >= 1 and e.batch_size >= 1
    for key in ("epochs", "batch_size"):
        raw = _raw()
        raw["classifiers"]["isic_eval"][key] = 0
        with pytest.raises(ParamsError, match=rf"classifiers\.isic_eval\.{key}"):
            validate_params(raw)


def test_validation_split_is_checked():
    """generate.split: validation needs its own seeds and at least one CXR validation report."""
    params = validate_params(_raw())
    assert params.generate.split == "test" and params.cxr.prepare.n_val >= 1
    for track in ("isic", "cxr"):
        raw = _raw()
        raw["generate"][track]["validation_seed"] = raw["generate"][track]["seed"]
        with pytest.raises(ParamsError, match=rf"generate\.{track}\.validation_seed.*other than generate\.{track}\.seed"):
            validate_params(raw)
    raw = _raw()
    raw["generate"]["split"], raw["cxr"]["prepare"]["n_val"] = "validation", 0
    with pytest.raises(ParamsError, match=r"cxr\.prepare\.n_val: 0, but generate\.split is validation"):
        validate_params(raw)
    raw["generate"]["split"] = "valid"
    with pytest.raises(ParamsError, match=r"generate\.split"):
        validate_params(raw)


def test_variant_prompt_repeats_is_checked():
    """A variant's own prompt_repeats (the repeated-reports setting) must divide the CXR batch too."""
    params = validate_params(_raw())
    assert params.rl.cxr.variants["repeated"].prompt_repeats == 8 and params.rl.cxr.variants["full"].prompt_repeats is None
    raw = _raw()
    raw["rl"]["cxr"]["variants"]["repeated"]["prompt_repeats"] = 3
    with pytest.raises(ParamsError, match=r"rl\.cxr\.variants\.repeated\.prompt_repeats': 3 does not divide"):
        validate_params(raw)
