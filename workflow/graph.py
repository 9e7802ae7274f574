"""The stage graph: the ONE definition both engines are generated from.

``workflow/export.py`` writes ``dvc.yaml`` and ``workflow/rules/*.smk`` from STAGES;
``tests/test_workflow_graph.py`` fails when the committed files drift from it.
Each stage is a short function over ``src/medrl``: it receives explicit paths and params.

Path templates may contain the wildcards ``{variant}`` (a CXRL ablation: a key of
``rl.cxr.variants``) and ``{seed}`` (an RL seed). A stage's ``foreach`` lists its jobs as grids
(wildcard -> the params key holding its values); Snakemake sees a wildcard rule, DVC a
``foreach`` stage over the jobs. The RL stages and what they feed run for the default seed
(``rl.<track>.seed``, target ``all``) and for every seed of ``rl.seeds`` (target ``all_seeds``;
CXR: the variants of ``rl.cxr.seed_variants``). An aggregate names, per dep, the grid that
expands its template into several paths (``expand``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# ----------------------------------------------------------------------------- stage type


@dataclass
class Ctx:
    """What a running stage gets: resolved paths (temp paths for outputs), params, logging."""

    params: Any  # ParamsView of the validated medrl.config.Params: only the stage's declared keys
    deps: dict[str, Path]
    outs: dict[str, Path]
    wildcards: dict[str, str]
    ckpt: Path  # resumable checkpoints; survives a killed run, removed by the stage at the end
    device: str
    log: Callable[[dict[str, float], int | None], None]
    log_artifact: Callable[[Path], None]
    workspace: Path
    # an aggregate's expanded deps: dep name -> [(wildcards, path)], in params order
    expanded: dict[str, list[tuple[dict[str, str], Path]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    """How ``snakemake --report`` shows one output folder of a stage.

    ``patterns``: Snakemake wildcard patterns of the files to show, relative to the folder (a
    pattern needs at least one wildcard, e.g. ``{name,grid}.png``); ``caption``: a
    reStructuredText file under ``workflow/report/`` (Jinja-rendered per file, with
    ``snakemake.wildcards`` and ``snakemake.output``); ``category`` / ``subcategory`` group the
    results in the report and may contain ``{variant}``.
    """

    out: str  # a key of the stage's outs
    patterns: tuple[str, ...]
    caption: str
    category: str
    subcategory: str | None = None


Grid = dict[str, str]  # wildcard -> dotted params key of its values (mapping keys, list items or one value)


@dataclass(frozen=True)
class Stage:
    name: str
    track: str
    run: Callable[[Ctx], dict]
    deps: dict[str, str]
    outs: dict[str, str]
    params: tuple[str, ...]  # dotted params.yaml keys (leaf or section); may contain {variant}
    gpu: bool = False  # ask SLURM for a GPU
    accelerate: bool = False  # launch through `accelerate launch` (multi-GPU capable)
    foreach: tuple[Grid, ...] = ()  # the jobs: the union of each grid's combinations; () = one job
    expand: dict[str, Grid] = field(default_factory=dict)  # aggregate: dep name -> the grid its path expands over
    report: tuple[Report, ...] = ()  # outputs shown by `snakemake --report` (Snakemake only)
    priority: int = 0  # Snakemake runs higher first among ready jobs: the critical path's long stages
    doc: str = ""

    @property
    def wildcards(self) -> tuple[str, ...]:
        """The wildcards of the stage's jobs, in WILDCARDS order."""
        return tuple(w for w in WILDCARDS if self.foreach and w in self.foreach[0])

    def cmd(self, fmt: Callable[[str], str] = lambda w: w) -> str:
        """The command; ``fmt(wildcard)`` is how the engine writes a wildcard's value."""
        launcher = "accelerate launch" if self.accelerate else "python"
        return " ".join([f"{launcher} workflow/entry.py {self.name}", *(f"--{w} {fmt(w)}" for w in self.wildcards)])


STAGES: dict[str, Stage] = {}
WILDCARDS = ("variant", "seed")  # the wildcards a path template may contain, in job-name order


def values_of(params: Any, key: str) -> list[str]:
    """A wildcard's values at dotted ``key`` of params (raw dict or Params): a mapping's keys, a
    list's items, or a single value."""
    node = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    if isinstance(node, dict):
        return list(node)
    return [str(v) for v in node] if isinstance(node, (list, tuple)) else [str(node)]


variants_of = values_of  # the {variant} values: the keys of rl.cxr.variants


def grid_jobs(params: Any, grid: Grid) -> list[dict[str, str]]:
    """Every combination of the grid's wildcard values, as wildcards dicts (WILDCARDS order)."""
    names = [w for w in WILDCARDS if w in grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*(values_of(params, grid[w]) for w in names))]


def jobs_of(stage: Stage, params: Any) -> list[dict[str, str]]:
    """The stage's jobs (wildcards dicts), each once, in grid order; ``[{}]`` for a plain stage."""
    if not stage.foreach:
        return [{}]
    out: list[dict[str, str]] = []
    for grid in stage.foreach:
        out += [wc for wc in grid_jobs(params, grid) if wc not in out]
    return out


def job_key(wildcards: dict[str, str]) -> str:
    """One job's name suffix: ``full-s1`` (variant full, seed 1), ``s0``; ``""`` for no wildcards."""
    return "-".join(f"s{wildcards[w]}" if w == "seed" else wildcards[w] for w in WILDCARDS if w in wildcards)


def fill(template: str, wildcards: dict[str, str]) -> str:
    """A path template with this job's wildcard values."""
    return template.format(**wildcards) if wildcards else template

ISIC_REPORT = "RL4Med-DDPO (ISIC)"
CXR_REPORT = "CXRL (chest X-ray)"
SUMMARY_REPORT = "Summary (both tracks)"
# tables: the human-readable Markdown and the CSV (the caption shows the CSV as a table), not the
# LaTeX nor <stem>.values.csv
_TABLE_PATTERNS = (r"{name,[a-z0-9_]+}.{ext,md|csv}",)
# RL: the per-epoch reward curve (rewards.csv) and the sample grids of the first prompts
_RL_PATTERNS = (r"{name,rewards}.csv", r"{name,reward_curve}.png", r"samples/{name,epoch_\d+}.png")


class UndeclaredParamError(RuntimeError):
    """A stage read a params key outside its ``params=`` declaration: DVC and Snakemake would not
    rerun it when that key changes."""


class ParamsView:
    """Read-only view of the validated Params that lets a stage read only what it declares.

    A declared section grants its whole subtree (returned as the frozen pydantic object itself, so
    ``.model_dump()`` works); a declared leaf grants that leaf; the attributes / mapping items on
    the way to a declared key are views again. Anything else, including dumping or iterating over a
    section of which only part is declared, raises UndeclaredParamError naming stage and key.
    """

    __slots__ = ("_node", "_stage", "_keys", "_path")

    def __init__(self, node: Any, stage: str, keys: tuple[str, ...], path: str = ""):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_path", path)

    def _undeclared(self, dotted: str, how: str = "reads") -> UndeclaredParamError:
        return UndeclaredParamError(
            f"stage {self._stage} {how} params key '{dotted}', which it does not declare "
            f"(declared: {', '.join(self._keys) or 'none'}); add it to the stage's params=(...) in "
            f"workflow/graph.py and regenerate with workflow/export.py")

    def _child(self, name: str, value: Any) -> Any:
        dotted = f"{self._path}.{name}" if self._path else str(name)
        if any(dotted == k or dotted.startswith(k + ".") for k in self._keys):
            return value
        if any(k.startswith(dotted + ".") for k in self._keys) or isinstance(value, dict) or hasattr(
                type(value), "model_fields"):
            # on the way to a declared key, or an undeclared section: reading a leaf of it (or all
            # of it) raises, naming the full key
            return type(self)(value, self._stage, self._keys, dotted)
        raise self._undeclared(dotted)

    def __getattr__(self, name: str) -> Any:
        node = self._node
        fields = getattr(type(node), "model_fields", None)
        if fields is not None and name in fields:
            return self._child(name, getattr(node, name))
        if name.startswith("__") or not hasattr(node, name):
            raise AttributeError(f"params key '{self._path + '.' if self._path else ''}{name}' does not exist")
        # a method of the section (model_dump, items, ...): it would read undeclared keys
        raise self._undeclared(self._path or "<all params>", f"reads all of (via .{name})")

    def __getitem__(self, key: str) -> Any:
        if not isinstance(self._node, dict):
            raise TypeError(f"params section '{self._path}' is not a mapping")
        return self._child(key, self._node[key])

    def __iter__(self):
        raise self._undeclared(self._path or "<all params>", "iterates over")

    def __len__(self) -> int:
        raise self._undeclared(self._path or "<all params>", "iterates over")

    def __contains__(self, key: object) -> bool:
        raise self._undeclared(self._path or "<all params>", "iterates over")

    def __bool__(self) -> bool:
        if isinstance(self._node, dict):
            raise self._undeclared(self._path or "<all params>", "iterates over")
        return True

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("params are read-only")

    __delattr__ = __setattr__

    def __repr__(self) -> str:
        return f"ParamsView({self._path or '<root>'} of stage {self._stage})"


def declared_keys(stage: Stage, wildcards: dict[str, str]) -> tuple[str, ...]:
    """The stage's params keys with ``{variant}`` filled in for this job."""
    return tuple(k.format(**wildcards) if "{" in k and wildcards else k for k in stage.params)


def stage_params(stage: Stage, params: Any, wildcards: dict[str, str]) -> ParamsView:
    """What ``Ctx.params`` is when a stage runs: ``params`` restricted to the stage's declared keys."""
    label = stage.name + "".join(f"[{wildcards[w]}]" for w in WILDCARDS if w in wildcards)
    return ParamsView(params, label, declared_keys(stage, wildcards))


def stage(**kw: Any) -> Callable[[Callable[[Ctx], dict]], Callable[[Ctx], dict]]:
    def register(fn: Callable[[Ctx], dict]) -> Callable[[Ctx], dict]:
        s = Stage(name=fn.__name__, run=fn, doc=(fn.__doc__ or "").strip(), **kw)
        if len({frozenset(g) for g in s.foreach}) > 1:
            raise ValueError(f"stage {s.name}: every foreach grid must have the same wildcards")
        STAGES[s.name] = s
        return fn

    return register


# ============================================================================= data

@stage(track="isic", deps={}, outs={"dataset": "data/datasets/isic"},
       params=("isic.source", "isic.phantom", "isic.real"),
       report=(Report("dataset", (r"{name,grid}.png",), "data_grid.rst", ISIC_REPORT, "data"),))
def download_isic(c: Ctx) -> dict:
    """ISIC 2019 (real) or the dermoscopy phantoms (embedded default) in the normalised format."""
    p = c.params.isic
    if p.source == "phantom":
        from medrl.data.phantoms.derm import generate_derm_phantoms

        planted = p.phantom.planted.model_dump() if p.phantom.planted is not None else None
        return generate_derm_phantoms(c.outs["dataset"], n_images=p.phantom.n_images, size=p.phantom.size,
                                      seed=p.phantom.seed, planted=planted)
    from medrl.data.isic import acquire_isic

    r = p.real
    return acquire_isic(c.outs["dataset"], root=r.root, download=r.download, base_url=r.base_url,
                        artifact_csv=r.artifact_csv, cache_dir=r.cache_dir,
                        known_hashes=dict(r.known_hashes))


@stage(track="cxr", deps={}, outs={"dataset": "data/datasets/cxr"},
       params=("cxr.source", "cxr.phantom", "cxr.real"),
       report=(Report("dataset", (r"{name,grid}.png",), "data_grid.rst", CXR_REPORT, "data"),))
def download_cxr(c: Ctx) -> dict:
    """MIMIC-CXR-JPG (real, credentialed) or the chest-X-ray phantoms in the normalised format."""
    p = c.params.cxr
    if p.source == "phantom":
        from medrl.data.phantoms.cxr import generate_cxr_phantoms

        return generate_cxr_phantoms(c.outs["dataset"], n_images=p.phantom.n_images, size=p.phantom.size,
                                     seed=p.phantom.seed, frac_ap=p.phantom.frac_ap)
    from medrl.data.mimic import acquire_mimic

    r = p.real
    return acquire_mimic(c.outs["dataset"], root=r.root, download=r.download, base_url=r.base_url,
                         cache_dir=r.cache_dir, max_images=r.max_images, verify_checksums=r.verify_checksums)


def _tokenizer(c: Ctx, track: str, texts: list[str]) -> dict:
    pretrained = getattr(c.params.models, track).pretrained
    if pretrained:
        from transformers import CLIPTokenizer

        # same resolution as the model loader: a local diffusers dir, or a hub id in the local cache
        tok = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", local_files_only=True)
        tok.save_pretrained(c.outs["tokenizer"])
        return {"vocab_size": float(tok.vocab_size)}
    from medrl.data.tokenizer import build_tokenizer

    tok = build_tokenizer(texts, c.outs["tokenizer"], max_length=c.params.models.tiny.max_position_embeddings)
    return {"vocab_size": float(len(tok))}


@stage(track="isic", deps={"dataset": "data/datasets/isic"}, outs={"tokenizer": "data/models/isic/tokenizer"},
       params=("models.isic.pretrained", "models.tiny.max_position_embeddings"))
def tokenizer_isic(c: Ctx) -> dict:
    """CLIP BPE tokenizer built from the ISIC prompt grammar (or the pretrained model's)."""
    from medrl.data.prompts import ISIC_COLUMNS, evaluation_prompts, labels_to_prompt
    from medrl.io import read_table

    labels = read_table(c.deps["dataset"] / "labels.csv", ISIC_COLUMNS)
    texts = sorted({labels_to_prompt(row) for row in labels.to_dict("records")} | set(evaluation_prompts()))
    return _tokenizer(c, "isic", texts)


@stage(track="cxr", deps={"dataset": "data/datasets/cxr"}, outs={"tokenizer": "data/models/cxr/tokenizer"},
       params=("models.cxr.pretrained", "models.tiny.max_position_embeddings"))
def tokenizer_cxr(c: Ctx) -> dict:
    """CLIP BPE tokenizer trained on the report impressions (or the pretrained model's)."""
    from medrl.data.reports import extract_impression
    from medrl.io import read_table

    meta = read_table(c.deps["dataset"] / "metadata.csv", ["report", "split"])
    texts = [extract_impression(r) for r in meta.loc[meta.split == "train", "report"].astype(str)]
    return _tokenizer(c, "cxr", texts)


@stage(track="isic", deps={"dataset": "data/datasets/isic"}, outs={"prepared": "data/prepared/isic"},
       params=("isic.prepare",))
def prepare_isic(c: Ctx) -> dict:
    """Prompts in the RL4Med grammar, train / cls_b / test splits, per-prompt real folders."""
    from medrl.data.prepare import prepare_isic as run

    p = c.params.isic.prepare
    return run(c.deps["dataset"], c.outs["prepared"], size=p.size, frac_cls_b=p.frac_cls_b, frac_test=p.frac_test, seed=p.seed)


@stage(track="cxr", deps={"dataset": "data/datasets/cxr", "tokenizer": "data/models/cxr/tokenizer"},
       outs={"prepared": "data/prepared/cxr"}, params=("cxr.prepare",))
def prepare_cxr(c: Ctx) -> dict:
    """PA/AP filter, impressions <= max_tokens, train/test/validate pairs, labels, canonical CXR."""
    from medrl.data.prepare import prepare_cxr as run

    p = c.params.cxr.prepare
    return run(c.deps["dataset"], c.deps["tokenizer"], c.outs["prepared"], size=p.size, max_tokens=p.max_tokens,
               n_train=p.n_train, n_test=p.n_test, n_val=p.n_val, n_canonical=p.n_canonical, seed=p.seed,
               planted=p.planted.model_dump() if p.planted is not None else None)


# ============================================================================= diffusion stack

# track -> (items table, fine-tune text column, true prompt column, image mode)
_ITEMS = {"isic": ("items.csv", "caption", "prompt", "RGB"), "cxr": ("pairs.csv", "caption", "impression", "L")}


def _train_paths(prepared: Path, track: str) -> list[Path]:
    from medrl.io import read_table

    fname = _ITEMS[track][0]
    items = read_table(prepared / fname, ["path", "split"])
    return [Path(p) for p in items.loc[items.split == "train", "path"]]


def _stack(c: Ctx, track: str) -> dict:
    from medrl.diffusion.stack import build_stack

    m = c.params.models
    size = getattr(c.params, track).prepare.size
    return build_stack(c.outs["stack"], pretrained=getattr(m, track).pretrained, tokenizer_dir=c.deps["tokenizer"],
                       train_images=_train_paths(c.deps["prepared"], track), image_size=size,
                       channels_mode=_ITEMS[track][3], tiny=m.tiny.model_dump(), vae_train=m.vae_train.model_dump(),
                       ckpt_dir=c.ckpt, seed=c.params.run.seed, device=c.device)


@stage(track="isic", deps={"prepared": "data/prepared/isic", "tokenizer": "data/models/isic/tokenizer"},
       outs={"stack": "data/models/isic/stack"},
       params=("models.isic.pretrained", "models.tiny", "models.vae_train", "isic.prepare.size", "run.seed"))
def stack_isic(c: Ctx) -> dict:
    """SD-layout model stack: tiny UNet/VAE/CLIP (VAE trained here) or SD v1.5 from a dir/hub id."""
    return _stack(c, "isic")


@stage(track="cxr", deps={"prepared": "data/prepared/cxr", "tokenizer": "data/models/cxr/tokenizer"},
       outs={"stack": "data/models/cxr/stack"},
       params=("models.cxr.pretrained", "models.tiny", "models.vae_train", "cxr.prepare.size", "run.seed"))
def stack_cxr(c: Ctx) -> dict:
    """SD-layout model stack for CXR: tiny (VAE trained here) or RoentGen from a dir/hub id."""
    return _stack(c, "cxr")


def _latents(c: Ctx, track: str) -> dict:
    from medrl.io import read_table
    from medrl.diffusion.latents import extract_latents

    fname, text_col, prompt_col, mode = _ITEMS[track]
    items = read_table(c.deps["prepared"] / fname, ["path", "split", text_col, prompt_col])
    return extract_latents(c.deps["stack"], items, c.outs["latents"], size=getattr(c.params, track).prepare.size,
                           mode=mode, text_col=text_col, prompt_col=prompt_col, device=c.device)


@stage(track="isic", deps={"stack": "data/models/isic/stack", "prepared": "data/prepared/isic"},
       outs={"latents": "data/latents/isic"}, params=("isic.prepare.size",), priority=10)
def latents_isic(c: Ctx) -> dict:
    """VAE latents of every prepared ISIC image, content-hashed against the VAE."""
    return _latents(c, "isic")


@stage(track="cxr", deps={"stack": "data/models/cxr/stack", "prepared": "data/prepared/cxr"},
       outs={"latents": "data/latents/cxr"}, params=("cxr.prepare.size",), priority=10)
def latents_cxr(c: Ctx) -> dict:
    """VAE latents of every prepared CXR image, content-hashed against the VAE."""
    return _latents(c, "cxr")


def _finetune(c: Ctx, track: str) -> dict:
    from medrl.diffusion.finetune import finetune_base

    f, t = c.params.models.finetune_base, getattr(c.params.models, track)
    lr = f.lr if t.finetune_lr is None else t.finetune_lr
    text = f.train_text_encoder if t.train_text_encoder is None else t.train_text_encoder
    return finetune_base(c.deps["stack"], c.deps["latents"], c.outs["base"], steps=f.steps, batch_size=f.batch_size,
                         lr=lr, cond_dropout=f.cond_dropout, checkpoint_every=f.checkpoint_every, seed=f.seed,
                         ckpt_dir=c.ckpt, unet_weights=t.unet_weights, train_text_encoder=text,
                         text_pretrain_steps=t.text_pretrain_steps, device=c.device,
                         mixed_precision=c.params.run.mixed_precision, log_fn=c.log)


_FINETUNE_TRACK_KEYS = ("unet_weights", "finetune_lr", "train_text_encoder", "text_pretrain_steps")  # models.<track>.*


@stage(track="isic", deps={"stack": "data/models/isic/stack", "latents": "data/latents/isic"},
       outs={"base": "data/models/isic/base"},
       params=("models.finetune_base", *(f"models.isic.{k}" for k in _FINETUNE_TRACK_KEYS), "run.mixed_precision"),
       gpu=True, accelerate=True, priority=10)
def finetune_base_isic(c: Ctx) -> dict:
    """The 'SD fine-tuned on ISIC' baseline: supervised text-to-image fine-tuning of the UNet."""
    return _finetune(c, "isic")


@stage(track="cxr", deps={"stack": "data/models/cxr/stack", "latents": "data/latents/cxr"},
       outs={"base": "data/models/cxr/base"},
       params=("models.finetune_base", *(f"models.cxr.{k}" for k in _FINETUNE_TRACK_KEYS), "run.mixed_precision"),
       gpu=True, accelerate=True, priority=10)
def finetune_base_cxr(c: Ctx) -> dict:
    """The anchor (RoentGen's role): supervised report-to-CXR fine-tuning of the UNet."""
    return _finetune(c, "cxr")


# ============================================================================= reward / metric models


def _classifier(c: Ctx, heads_name: str) -> dict:
    import shutil

    from medrl.data.prompts import ARTIFACTS4, HEADS6
    from medrl.io import read_table
    from medrl.models.classifiers import train_classifier
    from medrl.diffusion.latents import add_vae_roundtrips

    k, size = c.params.classifiers.isic, c.params.isic.prepare.size
    # the metric model (H=4) is independent of the reward (H=6): disjoint split and another seed
    heads, split, seed = (HEADS6, "train", k.seed) if heads_name == "h6" else (ARTIFACTS4, "cls_b", k.seed + 1)
    budget = k if heads_name == "h6" else c.params.classifiers.isic_eval
    items = read_table(c.deps["prepared"] / "items.csv", ["path", "split", *heads])
    roundtrips = c.ckpt / "roundtrips"
    if k.roundtrip:  # judge the decoder's domain too: the same images through the stack's VAE
        items = add_vae_roundtrips(c.deps["stack"], items, split, roundtrips, size=size, device=c.device)
    metrics = train_classifier(items, heads, c.outs["clf"], train_split=split, eval_split="test", size=size,
                               epochs=budget.epochs, batch_size=budget.batch_size, lr=k.lr, seed=seed,
                               imagenet_weights=k.imagenet_weights, ckpt_dir=c.ckpt, device=c.device,
                               pixel_branch=k.pixel_branch)
    shutil.rmtree(roundtrips, ignore_errors=True)
    return metrics


@stage(track="isic", deps={"prepared": "data/prepared/isic", "stack": "data/models/isic/stack"},
       outs={"clf": "data/models/isic/clf_h6"}, params=("classifiers.isic", "isic.prepare.size"), gpu=True)
def classifier_isic_h6(c: Ctx) -> dict:
    """H=6 artifact + diagnosis classifier (EfficientNet-B0) on the train split: the RL reward."""
    return _classifier(c, "h6")


@stage(track="isic", deps={"prepared": "data/prepared/isic", "stack": "data/models/isic/stack"},
       outs={"clf": "data/models/isic/clf_h4"},
       params=(*(f"classifiers.isic.{k}" for k in ("lr", "seed", "roundtrip", "imagenet_weights", "pixel_branch")),
               "classifiers.isic_eval", "isic.prepare.size"), gpu=True)
def classifier_isic_h4(c: Ctx) -> dict:
    """H=4 artifact classifier on the disjoint cls_b split, with its own training budget: the APR metric model."""
    return _classifier(c, "h4")


def _pairs(c: Ctx):
    from medrl.io import read_table

    return read_table(c.deps["prepared"] / "pairs.csv", ["path", "split", "impression"])


# The CXR reward nets (posture_cxr, diag_cxr, dualenc_cxr) and their independent evaluators
# (*_cxr_eval), as ISIC's H=6 reward and H=4 evaluator: the train pairs are split by a hash of the
# image id (classifiers.cxr_eval.reward_share), so the two never share a training image; an
# evaluator also has another seed (+ seed_offset) and another width. Released weights
# (classifiers.diag.weights / dualenc.checkpoint) are used by both: then that evaluator is the
# reward net itself (the metrics JSON and the tables say so).
_JUDGE_SPLIT = "classifiers.cxr_eval.reward_share"


def _judge_pairs(c: Ctx, judge: str):
    """pairs.csv without the other judge's train rows (``medrl.models.training.judge_pairs``)."""
    from medrl.models.training import judge_pairs

    return judge_pairs(_pairs(c), judge, c.params.classifiers.cxr_eval.reward_share)


def _posture(c: Ctx, judge: str) -> dict:
    from medrl.io import load_image
    from medrl.models.posture import train_posture_aligner

    k, size = c.params.classifiers.posture, c.params.cxr.prepare.size
    e = c.params.classifiers.cxr_eval
    seed, width = (k.seed, k.width) if judge == "reward" else (k.seed + e.seed_offset, e.posture_width)
    # the canonical image (the mean of train images of both halves) is the target of r_align
    # itself: both judges must measure the same posture
    canonical = load_image(c.deps["prepared"] / "canonical.png", size=size, mode="L")
    return train_posture_aligner(_judge_pairs(c, judge), canonical, c.outs["model"], size=size, epochs=k.epochs,
                                 batch_size=k.batch_size, lr=k.lr, seed=seed, width=width, ckpt_dir=c.ckpt,
                                 device=c.device)


@stage(track="cxr", deps={"prepared": "data/prepared/cxr"}, outs={"model": "data/models/cxr/aligner"},
       params=("classifiers.posture", "cxr.prepare.size", _JUDGE_SPLIT), gpu=True)
def posture_cxr(c: Ctx) -> dict:
    """ResNet-18 posture aligner trained with L2 to the canonical CXR on the reward half of the
    train pairs: r_align; psi error on phantoms."""
    return _posture(c, "reward")


@stage(track="cxr", deps={"prepared": "data/prepared/cxr"}, outs={"model": "data/models/cxr/aligner_eval"},
       params=("classifiers.posture", "cxr.prepare.size", _JUDGE_SPLIT, "classifiers.cxr_eval.seed_offset",
               "classifiers.cxr_eval.posture_width"), gpu=True)
def posture_cxr_eval(c: Ctx) -> dict:
    """The independent posture evaluator: the other half of the train pairs, seed + seed_offset, posture_width."""
    return _posture(c, "eval")


def _diag(c: Ctx, judge: str) -> dict:
    from medrl.models.xrv_diag import build_diag, save_diag, train_diag

    k = c.params.classifiers.diag
    if k.weights:  # released torchxrayvision weights: used as they are, never fine-tuned
        save_diag(build_diag(k.weights, growth_rate=k.growth_rate), c.outs["model"])
        return {"pretrained": 1.0}
    e = c.params.classifiers.cxr_eval
    seed, growth = (k.seed, k.growth_rate) if judge == "reward" else (k.seed + e.seed_offset, e.diag_growth_rate)
    return train_diag(_judge_pairs(c, judge), c.outs["model"], size=c.params.cxr.prepare.size, epochs=k.epochs,
                      batch_size=k.batch_size, lr=k.lr, growth_rate=growth, seed=seed, ckpt_dir=c.ckpt,
                      device=c.device, operating_point=k.operating_point)


@stage(track="cxr", deps={"prepared": "data/prepared/cxr"}, outs={"model": "data/models/cxr/diag"},
       params=("classifiers.diag", "cxr.prepare.size", _JUDGE_SPLIT), gpu=True)
def diag_cxr(c: Ctx) -> dict:
    """torchxrayvision DenseNet-121 diagnostic model (local weights, or trained on the reward half of the phantoms)."""
    return _diag(c, "reward")


@stage(track="cxr", deps={"prepared": "data/prepared/cxr"}, outs={"model": "data/models/cxr/diag_eval"},
       params=("classifiers.diag", "cxr.prepare.size", _JUDGE_SPLIT, "classifiers.cxr_eval.seed_offset",
               "classifiers.cxr_eval.diag_growth_rate"), gpu=True)
def diag_cxr_eval(c: Ctx) -> dict:
    """The independent diagnostic evaluator: the other half, seed + seed_offset, diag_growth_rate
    (with released weights: those weights again, not independent)."""
    return _diag(c, "eval")


def _dualenc(c: Ctx, judge: str) -> dict:
    from medrl.models.dual_encoder import load_dual_encoder, save_dual_encoder, train_dual_encoder

    k = c.params.classifiers.dualenc
    if k.checkpoint:  # a CXR-CLIP checkpoint, converted once into our safetensors directory
        save_dual_encoder(load_dual_encoder(k.checkpoint), c.outs["model"])
        return {"pretrained": 1.0}
    e = c.params.classifiers.cxr_eval
    seed, dim = (k.seed, k.embed_dim) if judge == "reward" else (k.seed + e.seed_offset, e.dualenc_embed_dim)
    return train_dual_encoder(_judge_pairs(c, judge), c.outs["model"], size=c.params.cxr.prepare.size,
                              epochs=k.epochs, batch_size=k.batch_size, lr=k.lr, embed_dim=dim, seed=seed,
                              ckpt_dir=c.ckpt, augment=k.augment, weight_decay=k.weight_decay, device=c.device)


@stage(track="cxr", deps={"prepared": "data/prepared/cxr"}, outs={"model": "data/models/cxr/dualenc"},
       params=("classifiers.dualenc", "cxr.prepare.size", _JUDGE_SPLIT), gpu=True)
def dualenc_cxr(c: Ctx) -> dict:
    """CXR-CLIP-style image-report dual encoder (checkpoint, or trained contrastively on the reward half)."""
    return _dualenc(c, "reward")


@stage(track="cxr", deps={"prepared": "data/prepared/cxr"}, outs={"model": "data/models/cxr/dualenc_eval"},
       params=("classifiers.dualenc", "cxr.prepare.size", _JUDGE_SPLIT, "classifiers.cxr_eval.seed_offset",
               "classifiers.cxr_eval.dualenc_embed_dim"), gpu=True)
def dualenc_cxr_eval(c: Ctx) -> dict:
    """The independent image-report evaluator: the other half, seed + seed_offset, dualenc_embed_dim
    (with a CXR-CLIP checkpoint: that checkpoint again, not independent)."""
    return _dualenc(c, "eval")


# ============================================================================= RL


# The RL jobs: the default seed (`all`) and every seed of rl.seeds (`all_seeds`); for CXR every
# variant at its default seed and the headline variants (rl.cxr.seed_variants) at every seed.
ISIC_SEEDS = ({"seed": "rl.isic.seed"}, {"seed": "rl.seeds"})
CXR_JOBS = ({"variant": "rl.cxr.variants", "seed": "rl.cxr.seed"},
            {"variant": "rl.cxr.seed_variants", "seed": "rl.seeds"})
# the RLTrack keys of rl.<track> that a run reads (its seed comes from the {seed} wildcard)
_RL_TRACK = ("epochs", "sample_batch_size", "sample_batches_per_epoch", "lr", "kl_coef", "clip_range", "skip_last_steps",
             "prompt_repeats", "text_lora_rank")


def _ddpo_config(c: Ctx, track: str, track_overrides: dict[str, Any] | None = None, **extra: Any):
    """The trainer's settings: rl.<track> over rl.common (medrl.config.rl_track_settings; only
    the RLTrack keys of rl.cxr, so rl_cxr does not depend on every variant), ``track_overrides``
    (a variant's own RLTrack keys) over those, + run.mixed_precision; the seed is the job's {seed}
    wildcard."""
    from medrl.rl.trainer import DDPOConfig

    t = getattr(c.params.rl, track)  # a ParamsView: read only the declared RLTrack leaves
    settings = {k: getattr(t, k) for k in _RL_TRACK} | (track_overrides or {}) | {"seed": int(c.wildcards["seed"])}
    return DDPOConfig.from_params(c.params.rl.common, settings, track_name=track,
                                  mixed_precision=c.params.run.mixed_precision, **extra)


@stage(track="isic", deps={"base": "data/models/isic/base", "clf": "data/models/isic/clf_h6", "prepared": "data/prepared/isic"},
       outs={"rl": "data/rl/isic/seed_{seed}"},
       params=("rl.common", *(f"rl.isic.{k}" for k in _RL_TRACK), "run.mixed_precision"), gpu=True, accelerate=True,
       foreach=ISIC_SEEDS,
       report=(Report("rl", _RL_PATTERNS, "rl_training.rst", ISIC_REPORT, "RL training: seed {seed}"),))
def rl_isic(c: Ctx) -> dict:
    """DDPO fine-tuning (LoRA) with the H=6 artifact-classifier reward over the 32 prompts."""
    from medrl.io import read_json
    from medrl.rewards.isic import ArtifactReward
    from medrl.rl.trainer import train_ddpo

    prompts = read_json(c.deps["prepared"] / "prompts.json")
    reward = ArtifactReward(c.deps["clf"], device=c.device)
    return train_ddpo(c.deps["base"], c.outs["rl"], reward_fn=reward,
                      prompt_fn=lambda rng, n: [prompts[i] for i in rng.integers(0, len(prompts), n)],
                      cfg=_ddpo_config(c, "isic", use_ace=False, ace_tokens=0), ckpt_dir=c.ckpt, log_fn=c.log)


def _train_reports(c: Ctx) -> tuple[list[str], dict[str, dict[str, float]]]:
    from medrl.data.reports import PATHOLOGIES

    pairs = _pairs(c)
    train = pairs[pairs.split == "train"]
    labels = {r["impression"]: {k: r[k] for k in PATHOLOGIES} for r in train.to_dict("records")}
    return sorted(labels), labels


@stage(track="cxr", deps={"base": "data/models/cxr/base", "prepared": "data/prepared/cxr",
                          "diag": "data/models/cxr/diag", "dualenc": "data/models/cxr/dualenc"},
       outs={"bank": "data/models/cxr/anchor_bank"},
       params=("rl.cxr.bank_k", "rl.cxr.seed", "rl.cxr.diag_unmentioned", "rl.common.num_steps", "rl.common.guidance_scale",
               "rl.common.eta"),
       gpu=True)
def anchor_bank_cxr(c: Ctx) -> dict:
    """RLCF 'bank' mode: the frozen anchor's diag/consist scores per train report (K samples each)."""
    from medrl.rewards.cxr import build_anchor_bank

    reports, labels = _train_reports(c)
    r = c.params.rl
    return build_anchor_bank(c.deps["base"], reports, c.outs["bank"] / "bank.csv", k=r.cxr.bank_k, seed=r.cxr.seed,
                             num_steps=r.common.num_steps, guidance_scale=r.common.guidance_scale, eta=r.common.eta,
                             diag_dir=c.deps["diag"], dualenc_dir=c.deps["dualenc"], labels_for=labels.__getitem__,
                             diag_unmentioned=r.cxr.diag_unmentioned, device=c.device)


@stage(track="cxr", deps={"base": "data/models/cxr/base", "prepared": "data/prepared/cxr",
                          "aligner": "data/models/cxr/aligner", "diag": "data/models/cxr/diag",
                          "dualenc": "data/models/cxr/dualenc", "bank": "data/models/cxr/anchor_bank"},
       outs={"rl": "data/rl/cxr/{variant}/seed_{seed}"},
       params=("rl.common", *(f"rl.cxr.{k}" for k in _RL_TRACK), "rl.cxr.rlcf_mode", "rl.cxr.rlcf_paired_noise",
               "rl.cxr.ace_tokens", "rl.cxr.diag_unmentioned", "rl.cxr.variants.{variant}", "run.mixed_precision"),
       gpu=True, accelerate=True, foreach=CXR_JOBS,
       report=(Report("rl", _RL_PATTERNS, "rl_training.rst", CXR_REPORT, "RL training: {variant} seed {seed}"),))
def rl_cxr(c: Ctx) -> dict:
    """CXRL: DDPO with r = l_align r_align + l_diag r_diag + l_consist r_consist, RLCF and ACE per variant."""
    from medrl.rewards.cxr import CXRReward
    from medrl.rl.trainer import train_ddpo

    v = c.params.rl.cxr.variants[c.wildcards["variant"]]
    reports, labels = _train_reports(c)
    reward = CXRReward(c.deps["aligner"], c.deps["diag"], c.deps["dualenc"], l_align=v.l_align, l_diag=v.l_diag,
                       l_consist=v.l_consist, rlcf=v.rlcf, rlcf_mode=c.params.rl.cxr.rlcf_mode,
                       labels_for=labels.__getitem__, anchor_bank=c.deps["bank"] / "bank.csv",
                       diag_unmentioned=c.params.rl.cxr.diag_unmentioned, device=c.device)
    # a variant's own batch structure (the repeated-reports setting) overrides rl.cxr's
    own = {"prompt_repeats": v.prompt_repeats} if v.prompt_repeats is not None else None
    cfg = _ddpo_config(c, "cxr", own, use_ace=v.ace, ace_tokens=c.params.rl.cxr.ace_tokens,
                       rlcf_paired_noise=c.params.rl.cxr.rlcf_paired_noise)
    return train_ddpo(c.deps["base"], c.outs["rl"], reward_fn=reward,
                      prompt_fn=lambda rng, n: [reports[i] for i in rng.integers(0, len(reports), n)],
                      cfg=cfg, ckpt_dir=c.ckpt, log_fn=c.log)


@stage(track="cxr", deps={"base": "data/models/cxr/base", "prepared": "data/prepared/cxr",
                          "aligner": "data/models/cxr/aligner", "diag": "data/models/cxr/diag",
                          "dualenc": "data/models/cxr/dualenc", "bank": "data/models/cxr/anchor_bank",
                          "rl": "data/rl/cxr/full/seed_{seed}"},
       outs={"metrics": "data/metrics/cxr/rlcf_modes"}, expand={"rl": {"seed": "rl.cxr.seed"}},
       params=("rl.common", "rl.cxr.seed", "rl.cxr.sample_batch_size", "rl.cxr.sample_batches_per_epoch",
               "rl.cxr.compare_samples", "rl.cxr.diag_unmentioned", "rl.cxr.variants.full", "metrics.bootstrap", "metrics.ci"),
       gpu=True)
def rlcf_modes_cxr(c: Ctx) -> dict:
    """RLCF paired (own / shared step noise) vs bank on the same samples of the full policy: cost per epoch,
    reward mean and variance."""
    from medrl.io import write_json, write_table
    from medrl.metrics.rlcf_modes import MODES, PAIRED_MODES, compare_rlcf_modes

    reports, labels = _train_reports(c)
    r, v = c.params.rl, c.params.rl.cxr.variants["full"]
    m, per_sample = compare_rlcf_modes(
        c.deps["base"], c.deps["rl"] / "adapter", aligner_dir=c.deps["aligner"], diag_dir=c.deps["diag"],
        dualenc_dir=c.deps["dualenc"], bank=c.deps["bank"] / "bank.csv", reports=reports, labels_for=labels.__getitem__,
        n_samples=r.cxr.compare_samples, batch_size=r.cxr.sample_batch_size, seed=r.cxr.seed + 1,
        num_steps=r.common.num_steps, guidance_scale=r.common.guidance_scale, eta=r.common.eta,
        l_diag=v.l_diag if v.l_diag else 10.0, l_consist=v.l_consist if v.l_consist else 10.0,
        diag_unmentioned=r.cxr.diag_unmentioned,
        samples_per_epoch=r.cxr.sample_batch_size * r.cxr.sample_batches_per_epoch,
        n_boot=c.params.metrics.bootstrap, ci=c.params.metrics.ci, device=c.device)
    write_json(c.outs["metrics"] / "metrics.json", m)
    write_table(per_sample, c.outs["metrics"] / "per_sample.csv")
    out = {f"std_{mode}": m[f"std_{mode}"]["value"] for mode in MODES}
    for mode in PAIRED_MODES:
        out.update({f"cost_ratio_{mode}_over_bank": m[f"cost_ratio_{mode}_over_bank"],
                    f"var_ratio_{mode}_over_bank": m[f"var_ratio_{mode}_over_bank"]["value"],
                    f"mean_diff_{mode}_minus_bank": m[f"mean_diff_{mode}_minus_bank"]["value"]})
    return out


# ============================================================================= generation


def _generate(c: Ctx, prompts: list[str], n: int, seed: int, adapter: Path | None, prompt_ids=None) -> dict:
    from medrl.diffusion.generate import generate

    r = c.params.rl.common
    return generate(c.deps["base"], c.outs["samples"], prompts=prompts, n_per_prompt=n, seed=seed, adapter_dir=adapter,
                    num_steps=r.num_steps, guidance_scale=r.guidance_scale, eta=r.eta, device=c.device,
                    prompt_ids=prompt_ids)


_GEN_ISIC = ("generate.split", "generate.isic", "rl.common.num_steps", "rl.common.guidance_scale", "rl.common.eta")


def _isic_prompts(c: Ctx) -> list[str]:
    from medrl.io import read_json

    return read_json(c.deps["prepared"] / "prompts.json")


@stage(track="isic", deps={"base": "data/models/isic/base", "prepared": "data/prepared/isic"},
       outs={"samples": "data/samples/isic/sd"}, params=_GEN_ISIC, gpu=True)
def generate_sd_isic(c: Ctx) -> dict:
    """N images per prompt from the fine-tuned SD baseline (held-out seeds of generate.split)."""
    g = c.params.generate.isic
    return _generate(c, _isic_prompts(c), g.n_per_prompt, _isic_seed(c), None)


@stage(track="isic", deps={"base": "data/models/isic/base", "rl": "data/rl/isic/seed_{seed}", "prepared": "data/prepared/isic"},
       outs={"samples": "data/samples/isic/rl/seed_{seed}"}, params=_GEN_ISIC, gpu=True, foreach=ISIC_SEEDS)
def generate_rl_isic(c: Ctx) -> dict:
    """N images per prompt from SD+RL, with the same seeds as the SD samples."""
    g = c.params.generate.isic
    return _generate(c, _isic_prompts(c), g.n_per_prompt, _isic_seed(c), c.deps["rl"] / "adapter")


def _isic_seed(c: Ctx) -> int:
    g = c.params.generate
    return g.isic.seed if g.split == "test" else g.isic.validation_seed


def _held_out_reports(c: Ctx) -> tuple[list[str], list[str], int]:
    """(reports, image ids, seed) of generate.split: the test pairs, or the validate pairs."""
    g = c.params.generate
    name, seed = ("test", g.cxr.seed) if g.split == "test" else ("validate", g.cxr.validation_seed)
    pairs = _pairs(c)
    rows = pairs[pairs.split == name]
    return list(rows["impression"]), list(rows["image"].astype(str)), seed


_GEN_CXR = ("generate.split", "generate.cxr", "rl.common.num_steps", "rl.common.guidance_scale", "rl.common.eta")


@stage(track="cxr", deps={"base": "data/models/cxr/base", "prepared": "data/prepared/cxr"},
       outs={"samples": "data/samples/cxr/anchor"}, params=_GEN_CXR, gpu=True)
def generate_cxr_anchor(c: Ctx) -> dict:
    """Anchor (base) samples for every held-out report (generate.split: test or validate)."""
    reports, ids, seed = _held_out_reports(c)
    return _generate(c, reports, c.params.generate.cxr.n_per_report, seed, None, prompt_ids=ids)


@stage(track="cxr", deps={"base": "data/models/cxr/base", "rl": "data/rl/cxr/{variant}/seed_{seed}",
                          "prepared": "data/prepared/cxr"},
       outs={"samples": "data/samples/cxr/{variant}/seed_{seed}"}, params=_GEN_CXR, gpu=True, foreach=CXR_JOBS)
def generate_cxr(c: Ctx) -> dict:
    """Samples of one CXRL variant for every held-out report, same seeds as the anchor."""
    reports, ids, seed = _held_out_reports(c)
    return _generate(c, reports, c.params.generate.cxr.n_per_report, seed, c.deps["rl"] / "adapter", prompt_ids=ids)


# ============================================================================= metrics

_MET_ISIC_DEPS = {"prepared": "data/prepared/isic", "clf_h4": "data/models/isic/clf_h4", "clf_h6": "data/models/isic/clf_h6"}


def _metrics_isic(c: Ctx) -> dict:
    from medrl.metrics.isic_eval import evaluate_isic_samples

    m = c.params.metrics
    stack = c.deps.get("stack")
    return evaluate_isic_samples(c.deps["samples"], c.deps["prepared"], c.deps["clf_h4"], c.deps["clf_h6"],
                                 c.outs["metrics"], metrics=m.model_dump(), device=c.device, stack_dir=stack,
                                 image_size=c.params.isic.prepare.size if stack is not None else None)


@stage(track="isic", deps={"samples": "data/samples/isic/sd", "stack": "data/models/isic/stack", **_MET_ISIC_DEPS},
       outs={"metrics": "data/metrics/isic/sd"}, params=("metrics", "isic.prepare.size"))
def metrics_isic_sd(c: Ctx) -> dict:
    """APR (H=4), APR per prompt, H=6 reward, perceptual distance, FID/KID of the SD samples; and the APR
    ceiling of the stack's VAE (real test images before / after a VAE round trip)."""
    return _metrics_isic(c)


@stage(track="isic", deps={"samples": "data/samples/isic/rl/seed_{seed}", **_MET_ISIC_DEPS},
       outs={"metrics": "data/metrics/isic/rl/seed_{seed}"}, params=("metrics",), foreach=ISIC_SEEDS)
def metrics_isic_rl(c: Ctx) -> dict:
    """The same metrics for the SD+RL samples."""
    return _metrics_isic(c)


@stage(track="isic", deps={"prepared": "data/prepared/isic", "sd": "data/samples/isic/sd",
                           "rl": "data/samples/isic/rl/seed_{seed}"},
       outs={"metrics": "data/metrics/isic/augment"}, expand={"rl": {"seed": "rl.isic.seed"}},
       params=("metrics.augment", "isic.prepare.size", "classifiers.isic.imagenet_weights"), gpu=True)
def augment_isic(c: Ctx) -> dict:
    """MEL-vs-NV classifier on real / real+SD / real+RL data, scored per artifact subgroup."""
    from medrl.io import read_table
    from medrl.metrics.augment import augment_experiment

    a = c.params.metrics.augment
    items = read_table(c.deps["prepared"] / "items.csv", ["path", "split", "MEL", "NV"])
    synthetic = {"real": None, "real+sd": c.deps["sd"] / "manifest.csv", "real+rl": c.deps["rl"] / "manifest.csv"}
    return augment_experiment(items, synthetic, c.outs["metrics"], size=c.params.isic.prepare.size, epochs=a.epochs,
                              batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=c.device,
                              imagenet_weights=c.params.classifiers.isic.imagenet_weights, ckpt_dir=c.ckpt)


_MET_CXR_DEPS = {"prepared": "data/prepared/cxr", "aligner": "data/models/cxr/aligner", "diag": "data/models/cxr/diag",
                 "dualenc": "data/models/cxr/dualenc", "aligner_eval": "data/models/cxr/aligner_eval",
                 "diag_eval": "data/models/cxr/diag_eval", "dualenc_eval": "data/models/cxr/dualenc_eval"}
# every metric twice: the reward nets (paper protocol) and the independent evaluators; released
# weights make an evaluator the reward net itself
_MET_CXR_PARAMS = ("metrics", "rl.cxr.diag_unmentioned", "classifiers.diag.weights", "classifiers.dualenc.checkpoint")


def _metrics_cxr(c: Ctx, weights: dict[str, float] | None = None) -> dict:
    from medrl.metrics.cxr_eval import evaluate_cxr_samples

    k = c.params.classifiers
    evaluators = {n: c.deps[f"{n}_eval"] for n in ("aligner", "diag", "dualenc")}
    independent = {"aligner": True, "diag": not k.diag.weights, "dualenc": not k.dualenc.checkpoint}
    return evaluate_cxr_samples(c.deps["samples"], c.deps["prepared"], c.deps["aligner"], c.deps["diag"],
                                c.deps["dualenc"], c.outs["metrics"], evaluators=evaluators, independent=independent,
                                metrics=c.params.metrics.model_dump(), device=c.device,
                                diag_unmentioned=c.params.rl.cxr.diag_unmentioned, weights=weights,
                                stack_dir=c.deps.get("stack"))


@stage(track="cxr", deps={"samples": "data/samples/cxr/anchor", "stack": "data/models/cxr/stack", **_MET_CXR_DEPS},
       outs={"metrics": "data/metrics/cxr/anchor"}, params=_MET_CXR_PARAMS)
def metrics_cxr_anchor(c: Ctx) -> dict:
    """r_align, AUROC per pathology, r_diag, image-report similarity, FID (DenseNet features), MS-SSIM of the
    anchor, each judged by the reward nets and by the independent evaluators (eval_*), with each judge's
    accuracy on the held-out real test pairs and the AUROC per finding the stack's VAE leaves them."""
    return _metrics_cxr(c)


@stage(track="cxr", deps={"samples": "data/samples/cxr/{variant}/seed_{seed}", **_MET_CXR_DEPS},
       outs={"metrics": "data/metrics/cxr/{variant}/seed_{seed}"},
       params=(*_MET_CXR_PARAMS, "rl.cxr.variants.{variant}"), foreach=CXR_JOBS)
def metrics_cxr(c: Ctx) -> dict:
    """The same metrics for one CXRL variant, and its combined reward on the held-out reports."""
    v = c.params.rl.cxr.variants[c.wildcards["variant"]]
    return _metrics_cxr(c, weights={"l_align": v.l_align, "l_diag": v.l_diag, "l_consist": v.l_consist})


# ============================================================================= tables


@stage(track="isic", deps={"sd": "data/metrics/isic/sd", "rl": "data/metrics/isic/rl/seed_{seed}",
                           "augment": "data/metrics/isic/augment"},
       outs={"tables": "data/tables/isic"}, expand={"rl": {"seed": "rl.isic.seed"}},
       params=("metrics.bootstrap", "metrics.ci", "metrics.seed", "generate.split"),
       report=(Report("tables", _TABLE_PATTERNS, "table.rst", ISIC_REPORT, "tables"),))
def tables_isic(c: Ctx) -> dict:
    """RL4Med tables (CSV, Markdown, LaTeX): SD vs SD+RL, APR per prompt, augmentation."""
    from medrl.io import read_json, read_table
    from medrl.lineage import run_id_of
    from medrl.tables.rl4med import augment_metrics_from_per_image, build_rl4med_tables

    m = c.params.metrics
    metrics = {k: read_json(c.deps[k] / "metrics.json") for k in ("sd", "rl")}
    augment = augment_metrics_from_per_image(read_table(c.deps["augment"] / "per_image.csv"), n_boot=m.bootstrap,
                                             ci=m.ci, seed=m.seed)
    run_ids = {k: run_id_of(c.deps[k], c.workspace) or "" for k in ("sd", "rl", "augment")}
    sources = {k: str(c.deps[k] / "metrics.json") for k in ("sd", "rl")}
    build_rl4med_tables(metrics, augment, run_ids, c.outs["tables"], sources=sources, notes=[_split_note(c)])
    return {}


def _split_note(c: Ctx) -> str:
    """Which held-out samples the tables are built from (generate.split)."""
    if c.params.generate.split == "test":
        return "Held-out split: test (generate.split), the split every reported number comes from."
    return ("Held-out split: VALIDATION (generate.split): other sampling seeds and, for CXR, the validation "
            "reports; for choosing settings, not for reporting.")


@stage(track="isic", deps={"sd": "data/metrics/isic/sd", "rl": "data/metrics/isic/rl/seed_{seed}"},
       outs={"tables": "data/tables/isic_seeds"}, expand={"rl": {"seed": "rl.seeds"}}, params=("rl.seeds", "generate.split"),
       report=(Report("tables", _TABLE_PATTERNS, "table.rst", ISIC_REPORT, "tables over RL seeds"),))
def tables_isic_seeds(c: Ctx) -> dict:
    """SD+RL - SD in every RL seed of rl.seeds, their mean and spread, and a verdict across seeds."""
    from medrl.io import read_json
    from medrl.lineage import run_id_of
    from medrl.tables.rl4med import build_rl4med_seed_table

    rl = {wc["seed"]: d for wc, d in c.expanded["rl"]}
    dirs = {"sd": c.deps["sd"], **{f"rl-s{s}": rl[str(s)] for s in c.params.rl.seeds}}
    metrics = {k: read_json(d / "metrics.json") for k, d in dirs.items()}
    run_ids = {k: run_id_of(d, c.workspace) or "" for k, d in dirs.items()}
    build_rl4med_seed_table(metrics["sd"], {s: metrics[f"rl-s{s}"] for s in c.params.rl.seeds}, run_ids,
                            c.outs["tables"], sources={k: str(d / "metrics.json") for k, d in dirs.items()},
                            notes=[_split_note(c)])
    return {}


@stage(track="cxr", deps={"anchor": "data/metrics/cxr/anchor", "variants": "data/metrics/cxr/{variant}/seed_{seed}",
                          "rlcf_modes": "data/metrics/cxr/rlcf_modes"},
       outs={"tables": "data/tables/cxr"},
       params=("generate.split", "rl.cxr.variants", "rl.cxr.rlcf_mode", "rl.cxr.rlcf_paired_noise", "rl.cxr.prompt_repeats",
               "rl.common.prompt_repeats", "rl.common.num_steps", "rl.common.eta", "rl.common.guidance_scale"),
       expand={"variants": {"variant": "rl.cxr.variants", "seed": "rl.cxr.seed"}},
       report=(Report("tables", _TABLE_PATTERNS, "table.rst", CXR_REPORT, "tables"),))
def tables_cxr(c: Ctx) -> dict:
    """CXRL Tables 1, 2a, 2b, 3 with the paper's numbers beside ours."""
    from medrl.io import read_json
    from medrl.lineage import run_id_of
    from medrl.tables.cxrl import build_cxrl_tables, build_rlcf_modes_table
    from medrl.tables.cxrl_planted import build_cxrl_planted_table
    from medrl.tables.paper import CXRL_LABELS

    # the default seed's metrics of every variant
    variants = {wc["variant"]: d for wc, d in c.expanded["variants"]}
    dirs = {"anchor": c.deps["anchor"], **{v: variants[v] for v in c.params.rl.cxr.variants}}
    metrics = {k: read_json(d / "metrics.json") for k, d in dirs.items()}
    run_ids = {k: run_id_of(d, c.workspace) or "" for k, d in dirs.items()}
    notes = [_cxr_setting_note(c), _split_note(c)]
    build_cxrl_tables(metrics, run_ids, c.outs["tables"], sources={k: str(d / "metrics.json") for k, d in dirs.items()},
                      notes=notes)
    build_cxrl_planted_table(metrics, run_ids, c.outs["tables"], labels=CXRL_LABELS, notes=notes)
    build_rlcf_modes_table(read_json(c.deps["rlcf_modes"] / "metrics.json"),
                           run_id_of(c.deps["rlcf_modes"], c.workspace) or "", c.outs["tables"])
    return {}


def _cxr_setting_note(c: Ctx) -> str:
    r = c.params.rl
    reps, common_reps, noise = r.cxr.prompt_repeats, r.common.prompt_repeats, r.cxr.rlcf_paired_noise
    reps = common_reps if reps is None else reps
    mode = r.cxr.rlcf_mode + (f" (anchor shares the {noise} noise)" if r.cxr.rlcf_mode == "paired" else
                              " (per-report anchor means)")
    def batch(reps: int) -> str:
        return "reports drawn i.i.d." if reps == 1 else f"each drawn report repeated {reps}x per batch" + (
            " (the per-report advantage statistics cancel the anchor means, so RLCF equals direct rewards)"
            if r.cxr.rlcf_mode == "bank" else "")

    own = [f"variant {n}: {batch(v.prompt_repeats)}" for n, v in r.cxr.variants.items() if v.prompt_repeats is not None]
    return (f"RL setting: RLCF mode {mode}; {batch(reps)}{''.join('; ' + o for o in own)}; sampler DDIM, "
            f"{r.common.num_steps} steps, eta {r.common.eta:g}, guidance {r.common.guidance_scale:g}.")


@stage(track="cxr", deps={"anchor": "data/metrics/cxr/anchor", "variants": "data/metrics/cxr/{variant}/seed_{seed}"},
       outs={"tables": "data/tables/cxr_seeds"}, params=("rl.seeds", "rl.cxr.seed_variants", "generate.split"),
       expand={"variants": {"variant": "rl.cxr.seed_variants", "seed": "rl.seeds"}},
       report=(Report("tables", _TABLE_PATTERNS, "table.rst", CXR_REPORT, "tables over RL seeds"),))
def tables_cxr_seeds(c: Ctx) -> dict:
    """CXRL headline differences (variants - anchor, CXRL - ablations) in every RL seed, their mean
    and spread, and a verdict across seeds."""
    from medrl.io import read_json
    from medrl.lineage import run_id_of
    from medrl.tables.cxrl import build_cxrl_seed_table

    found = {(wc["variant"], wc["seed"]): d for wc, d in c.expanded["variants"]}
    dirs = {(v, s): found[(v, str(s))] for v in c.params.rl.cxr.seed_variants for s in c.params.rl.seeds}
    per_seed = {s: {v: read_json(dirs[(v, s)] / "metrics.json") for v in c.params.rl.cxr.seed_variants}
                for s in c.params.rl.seeds}
    run_ids = {f"{v}-s{s}": run_id_of(d, c.workspace) or "" for (v, s), d in dirs.items()}
    run_ids["anchor"] = run_id_of(c.deps["anchor"], c.workspace) or ""
    build_cxrl_seed_table(read_json(c.deps["anchor"] / "metrics.json"), per_seed, run_ids, c.outs["tables"],
                          notes=[_split_note(c)])
    return {}


# ============================================================================= summary
# Both tracks' claims in one short table. A stage has one track (its MLflow experiment
# medrl-<track> and its rules file workflow/rules/<track>.smk): this one is track "summary".


@stage(track="summary", deps={"isic": "data/tables/isic", "cxr": "data/tables/cxr"},
       outs={"summary": "data/tables/summary"}, params=("metrics.ci",),
       report=(Report("summary", _TABLE_PATTERNS, "table.rst", SUMMARY_REPORT),))
def summary(c: Ctx) -> dict:
    """Every claim of both papers in one table: the measured difference with its CI and the verdict."""
    from medrl.lineage import code_version
    from medrl.tables.summary import build_summary

    tables = c.deps["isic"].parent
    if c.deps["cxr"].parent != tables:
        raise ValueError(f"stage summary: the claims tables must share one folder ({c.deps['isic']}, {c.deps['cxr']})")
    build_summary(tables, c.outs["summary"], commit=code_version(), ci=c.params.metrics.ci)
    return {}


# Final targets of `snakemake all` (one RL seed) and of `snakemake all_seeds` (these + the
# tables over rl.seeds); `dvc repro` runs every stage, i.e. both.
TARGETS = ("data/tables/isic", "data/tables/cxr", "data/tables/summary")
SEED_TARGETS = ("data/tables/isic_seeds", "data/tables/cxr_seeds")
