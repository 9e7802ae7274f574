"""Schema of params.yaml, validated on load.

Unknown keys, wrong types and missing paths fail with a ParamsError that names the dotted
key. Each section is a pydantic model with ``extra="forbid"`` in strict mode: an int key takes
only an int (not ``true``, ``"5"`` or ``3.0``), a float key an int or a finite float (not a
bool, a string or ``.inf``/``.nan``), a bool key only ``true``/``false``. Note that PyYAML reads
``1e-3`` as a string: write ``1.0e-3`` or ``0.001``. Model widths and counts are >= 1, seeds
>= 0; URL keys take http(s) URLs without credentials.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional
from urllib.parse import urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator,
                      model_validator)

from medrl.errors import ParamsError
from medrl.redact import redact


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _http_url(value: str) -> str:
    """An http(s) URL with a host and no ``user:password@`` (that would reach logs and MLflow)."""
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"must be an http:// or https:// URL with a host, got scheme {parts.scheme!r}")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@host); PhysioNet credentials come "
                         "from the environment (PHYSIONET_USERNAME / PHYSIONET_PASSWORD)")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]
Seed = Annotated[int, Field(ge=0)]
Width = Annotated[int, Field(ge=1)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-fA-F]{64}$")]


class _ExistingPath(_S):
    """Helper base: fields listed in ``_paths`` must exist when not null."""

    _paths: tuple[str, ...] = ()


class Run(_S):
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_threads: int = Field(2, ge=1)


class IsicPlanted(_S):
    lesion: Literal["MEL", "NV"] = "MEL"
    artifact: Literal["hair", "gel_bubble", "ruler", "ink"] = "ruler"
    caption_fidelity: float = Field(0.0, ge=0, le=1)
    caption_noise: Literal["resample", "overclaim"] = "resample"  # what an untruthful caption states
    finetune_share: float = Field(1.0, gt=0, le=1)  # share of <lesion> images showing <artifact> the base is fine-tuned on


class IsicPhantom(_S):
    n_images: int = Field(1600, ge=8)
    size: int = Field(64, ge=16)
    seed: Seed = 0
    planted: Optional[IsicPlanted] = IsicPlanted()


class IsicReal(_S):
    root: Optional[str] = None
    download: bool = False
    base_url: HttpUrl = "https://isic-challenge-data.s3.amazonaws.com/2019"
    artifact_csv: Optional[str] = None
    cache_dir: str = "data/raw/isic"
    known_hashes: dict[str, Sha256] = {}  # file name -> "sha256:<64 hex>" (download mode)


class IsicPrepare(_S):
    size: int = Field(64, ge=16)
    frac_cls_b: float = Field(0.25, gt=0, lt=1)
    frac_test: float = Field(0.2, gt=0, lt=1)
    seed: Seed = 0


class Isic(_S):
    source: Literal["phantom", "real"] = "phantom"
    phantom: IsicPhantom = IsicPhantom()
    real: IsicReal = IsicReal()
    prepare: IsicPrepare = IsicPrepare()


class CxrPhantom(_S):
    n_images: int = Field(1600, ge=8)
    size: int = Field(64, ge=16)
    seed: Seed = 1
    frac_ap: float = Field(0.3, ge=0, le=1)


class CxrReal(_S):
    root: Optional[str] = None
    download: bool = False
    base_url: HttpUrl = "https://physionet.org/files"
    cache_dir: str = "data/raw/mimic"
    max_images: Optional[int] = Field(None, ge=1)
    # false: download a PhysioNet project that publishes no SHA256SUMS.txt (or files it does not
    # list) unverified; true (default): refuse, a missing checksum is an error
    verify_checksums: bool = True


class CxrPlanted(_S):
    finding: Literal["Effusion", "Edema", "Cardiomegaly"] = "Effusion"  # data.planted_reports.CLAIMS
    overclaim: float = Field(0.2, gt=0, le=1)  # share of train reports without it whose caption claims it
    finetune_share: float = Field(0.15, gt=0, le=1)  # share of train images stating it kept in the fine-tune set


class CxrPrepare(_S):
    size: int = Field(64, ge=16)
    max_tokens: int = Field(74, ge=4)
    n_train: int = Field(1000, ge=4)
    n_test: int = Field(200, ge=2)
    n_val: int = Field(50, ge=0)  # PA validation reports (source split "validate"); generate.split: validation
    n_canonical: int = Field(500, ge=1)
    seed: Seed = 0
    planted: Optional[CxrPlanted] = None  # the anchor's planted fine-tune data (data.planted_reports)


class Cxr(_S):
    source: Literal["phantom", "real"] = "phantom"
    phantom: CxrPhantom = CxrPhantom()
    real: CxrReal = CxrReal()
    prepare: CxrPrepare = CxrPrepare()


class TrackModel(_S):
    pretrained: Optional[str] = None
    unet_weights: Optional[str] = None
    # this track's base fine-tune, over models.finetune_base (null keeps that value)
    finetune_lr: Optional[float] = Field(None, gt=0)
    train_text_encoder: Optional[bool] = None
    # first steps of that fine-tune: the text encoder learns from the true prompts, then is frozen
    text_pretrain_steps: int = Field(0, ge=0)


class Tiny(_S):
    block_out_channels: list[Width] = Field([32, 64], min_length=1)
    layers_per_block: Width = 1
    cross_attention_dim: Width = 64
    attention_head_dim: Width = 8
    text_hidden_size: Width = 64
    text_layers: Width = 2
    text_heads: Width = 4
    max_position_embeddings: Width = 77
    vae_block_out_channels: list[Width] = Field([16, 32, 64], min_length=1)
    latent_channels: Width = 4
    # GroupNorm groups in the VAE; null = min(32, smallest width), i.e. one channel per group
    # in a 16-wide block: instance norm, which drops each image's colour statistics.
    vae_norm_groups: Optional[int] = Field(None, ge=1)


class VaeTrain(_S):
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    edge_weight: float = Field(1.0, ge=0)  # image-gradient L1 weight (keeps thin hairs/ticks)
    seed: Seed = 0


class FinetuneBase(_S):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    cond_dropout: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    seed: Seed = 0
    train_text_encoder: bool = False


class Models(_S):
    isic: TrackModel = TrackModel()
    cxr: TrackModel = TrackModel()
    tiny: Tiny = Tiny()
    vae_train: VaeTrain = VaeTrain()
    finetune_base: FinetuneBase = FinetuneBase()


class TrainCfg(_S):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: Seed = 0


class IsicClassifier(TrainCfg):
    arch: Literal["efficientnet_b0"] = "efficientnet_b0"
    imagenet_weights: Optional[str] = None
    pixel_branch: int = Field(0, ge=0)
    roundtrip: bool = False  # also train on the training images' round trips through the stack's VAE


class Posture(TrainCfg):
    arch: Literal["resnet18"] = "resnet18"
    width: int = Field(64, ge=8)  # ResNet-18 stem width (64 = ResNet-18 proper; the stages double it 3x)


class Diag(TrainCfg):
    weights: Optional[str] = None
    growth_rate: int = Field(12, ge=4)
    operating_point: Literal["youden", "none"] = "none"  # per-class op_threshs of a model trained here


class DualEnc(TrainCfg):
    checkpoint: Optional[str] = None
    embed_dim: int = Field(64, ge=8)
    augment: float = Field(1.0, ge=0, le=2)  # augment_cxr strength on training batches
    weight_decay: float = Field(1e-4, ge=0)


class IsicEval(_S):
    """The H=4 evaluator's training budget (stage classifier_isic_h4); the rest of its recipe is
    classifiers.isic's. Its own section, so that a longer-trained judge leaves the H=6 reward as it is."""

    epochs: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)


class CxrEval(_S):
    """The independent CXR evaluators (stages *_cxr_eval): the reward nets' recipe (their
    section's epochs, batch size, lr, ...) on the other half of the train pairs, with another seed
    and another width. Which half a pair is in: ``medrl.models.training.judge_split``."""

    reward_share: float = Field(0.5, gt=0, lt=1)  # share of the train pairs (by image-id hash) the reward nets get
    seed_offset: int = Field(1, ge=1)  # evaluator seed = the reward net's seed + this
    posture_width: int = Field(32, ge=8)  # the evaluator aligner's ResNet-18 stem width
    diag_growth_rate: int = Field(16, ge=4)  # the evaluator DenseNet's growth rate
    dualenc_embed_dim: int = Field(48, ge=8)  # the evaluator dual encoder's joint embedding width


class Classifiers(_S):
    isic: IsicClassifier = IsicClassifier()
    isic_eval: IsicEval = IsicEval()
    posture: Posture = Posture()
    diag: Diag = Diag()
    dualenc: DualEnc = DualEnc()
    cxr_eval: CxrEval = CxrEval()

    @model_validator(mode="after")
    def _eval_widths_differ(self) -> "Classifiers":
        e = self.cxr_eval
        for key, mine, reward in (("posture_width", e.posture_width, "posture.width"),
                                  ("diag_growth_rate", e.diag_growth_rate, "diag.growth_rate"),
                                  ("dualenc_embed_dim", e.dualenc_embed_dim, "dualenc.embed_dim")):
            section, leaf = reward.split(".")
            if mine == getattr(getattr(self, section), leaf):
                raise ValueError(f"cxr_eval.{key}: {mine} equals classifiers.{reward}; the independent "
                                 "evaluator needs another width than the reward net")
        return self


class RLCommon(_S):
    num_steps: int = Field(20, ge=1)
    eta: float = Field(1.0, ge=0)
    guidance_scale: float = Field(5.0, ge=1)
    lora_rank: int = Field(4, ge=1)
    text_lora_rank: int = Field(0, ge=0)  # LoRA on the text encoder's attention too; 0 = off
    full_finetune: bool = False
    lr: float = Field(3e-4, gt=0)
    clip_range: float = Field(1e-4, gt=0)
    adv_clip_max: float = Field(5.0, gt=0)
    timestep_fraction: float = Field(1.0, gt=0, le=1)
    skip_last_steps: int = Field(0, ge=0)  # last N denoising steps sampled, not trained on
    num_inner_epochs: int = Field(1, ge=1)
    train_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    per_prompt_buffer: int = Field(16, ge=1)
    per_prompt_min_count: int = Field(16, ge=1)
    prompt_repeats: int = Field(1, ge=1)
    log_base_reward: bool = False
    # log_base_reward: policy vs frozen base on a fixed set of this many prompts (one noise each),
    # every base_reward_every epochs and at the last one (the base is sampled once per run)
    base_reward_every: int = Field(5, ge=1)
    base_reward_samples: int = Field(16, ge=2)
    kl_coef: float = Field(0.0, ge=0)  # KL penalty towards the frozen base per denoising step (0 = DDPO)
    checkpoint_every: int = Field(5, ge=1)
    fuse_micro_steps: int = Field(1, ge=1)  # PPO micro-steps per forward/backward: execution only, same gradient


class RLTrack(_S):
    epochs: int = Field(30, ge=1)
    sample_batch_size: int = Field(32, ge=1)
    sample_batches_per_epoch: int = Field(2, ge=1)
    lr: float | None = Field(None, gt=0)  # overrides rl.common.lr for this track
    kl_coef: float | None = Field(None, ge=0)  # overrides rl.common.kl_coef for this track
    clip_range: float | None = Field(None, gt=0)  # overrides rl.common.clip_range for this track
    skip_last_steps: int | None = Field(None, ge=0)  # overrides rl.common.skip_last_steps for this track
    prompt_repeats: int | None = Field(None, ge=1)  # overrides rl.common.prompt_repeats for this track
    text_lora_rank: int | None = Field(None, ge=0)  # overrides rl.common.text_lora_rank for this track
    seed: Seed = 0


class Variant(_S):
    ace: bool = True
    rlcf: bool = True
    l_align: float = 1.0
    l_diag: float = 10.0
    l_consist: float = 10.0
    prompt_repeats: int | None = Field(None, ge=1)  # overrides rl.cxr.prompt_repeats for this variant


class RLCxr(RLTrack):
    rlcf_mode: Literal["paired", "bank"] = "bank"
    rlcf_paired_noise: Literal["initial", "shared"] = "initial"  # what a paired anchor shares with its sample
    bank_k: int = Field(4, ge=1)
    diag_unmentioned: Literal["ignore", "negative"] = "ignore"  # r_diag: classes a report does not mention
    ace_tokens: int = Field(3, ge=1)
    compare_samples: int = Field(64, ge=2)  # rlcf_modes_cxr: policy samples scored both ways
    variants: dict[str, Variant] = {}
    seed_variants: list[str] = []  # the variants also run for every seed of rl.seeds (all_seeds)

    @field_validator("variants")
    @classmethod
    def _names(cls, v: dict[str, Variant]) -> dict[str, Variant]:
        for name in v:
            if not name.replace("_", "").isalnum() or name == "anchor":
                raise ValueError(f"variant name {name!r} must be [A-Za-z0-9_] and not 'anchor'")
        return v

    @model_validator(mode="after")
    def _seed_variants(self) -> "RLCxr":
        unknown = [v for v in self.seed_variants if v not in self.variants]
        if unknown:
            raise ValueError(f"seed_variants {unknown} are not keys of rl.cxr.variants ({sorted(self.variants)})")
        if len(set(self.seed_variants)) != len(self.seed_variants):
            raise ValueError(f"seed_variants {self.seed_variants} repeat a variant")
        return self


def _unique(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat a seed")
    return seeds


class RL(_S):
    common: RLCommon = RLCommon()
    isic: RLTrack = RLTrack()
    cxr: RLCxr = RLCxr()
    # the RL seeds of the multi-seed comparison (`snakemake all_seeds`); `all` runs rl.<track>.seed only
    seeds: Annotated[list[Seed], Field(min_length=1), AfterValidator(_unique)] = [0, 1, 2]


class GenIsic(_S):
    n_per_prompt: int = Field(16, ge=1)
    seed: Seed = 1000
    validation_seed: Seed = 500


class GenCxr(_S):
    n_per_report: int = Field(2, ge=2)  # MS-SSIM diversity compares samples of one report
    seed: Seed = 2000
    validation_seed: Seed = 3000


class Generate(_S):
    # test: the held-out samples the tables report; validation: other seeds (ISIC: the 32 prompts
    # are the whole grammar) and the validation reports (CXR), for choosing settings
    split: Literal["test", "validation"] = "test"
    isic: GenIsic = GenIsic()
    cxr: GenCxr = GenCxr()

    @model_validator(mode="after")
    def _distinct_seeds(self):
        for name, g in (("isic", self.isic), ("cxr", self.cxr)):
            if g.seed == g.validation_seed:
                raise ValueError(f"generate.{name}.validation_seed: expected a seed other than generate.{name}.seed "
                                 f"({g.seed}), or validation would reuse the test noise")
        return self


class Metrics(_S):
    bootstrap: int = Field(1000, ge=10)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: Seed = 0
    inception_weights: Optional[str] = None
    lpips_weights: Optional[str] = None
    kid_subset_size: int = Field(50, ge=2)
    augment: TrainCfg = TrainCfg(epochs=6)


class Params(_S):
    run: Run = Run()
    isic: Isic = Isic()
    cxr: Cxr = Cxr()
    models: Models = Models()
    classifiers: Classifiers = Classifiers()
    rl: RL = RL()
    generate: Generate = Generate()
    metrics: Metrics = Metrics()

    @model_validator(mode="after")
    def _validation_reports(self):
        if self.generate.split == "validation" and self.cxr.prepare.n_val < 1:
            raise ValueError("cxr.prepare.n_val: 0, but generate.split is validation; expected >= 1 validation "
                             "reports to generate from")
        return self


# Dotted keys whose value, when set, must be an existing path.
PATH_KEYS = (
    "isic.real.root",
    "isic.real.artifact_csv",
    "cxr.real.root",
    "classifiers.isic.imagenet_weights",
    "classifiers.diag.weights",
    "classifiers.dualenc.checkpoint",
    "metrics.inception_weights",
    "metrics.lpips_weights",
    "models.isic.unet_weights",
    "models.cxr.unet_weights",
)


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"])


def rl_track_settings(common: RLCommon | dict[str, Any], track: RLTrack | dict[str, Any], *, name: str = "",
                      source: str = "params.yaml") -> dict[str, Any]:
    """The DDPO settings of one track: ``rl.common`` with ``rl.<track>``'s keys over it (a
    track's null keeps rl.common's value), checked across keys. The one place the per-track
    override merge and the RL cross-key checks live (medrl.rl.trainer.DDPOConfig takes its
    result). Dicts are validated against the schema first; a track dict may carry RLCxr's
    other keys (they are not returned)."""
    if not isinstance(common, RLCommon):
        common = RLCommon.model_validate(common)
    if not isinstance(track, RLTrack):
        unknown = sorted(set(track) - set(RLCxr.model_fields))
        if unknown:
            raise ParamsError(f"{source}: unknown keys {unknown} in rl.{name or '<track>'}")
        track = RLTrack.model_validate({k: v for k, v in track.items() if k in RLTrack.model_fields})
    where = f"rl.{name}" if name else "rl.<track>"
    out, origin = common.model_dump(), {k: "rl.common" for k in RLCommon.model_fields}
    for k in RLTrack.model_fields:
        if getattr(track, k) is not None:
            out[k], origin[k] = getattr(track, k), where
    reps, batch = out["prompt_repeats"], out["sample_batch_size"]
    if batch % reps:
        raise ParamsError(f"{source}: key '{origin['prompt_repeats']}.prompt_repeats': {reps} does not divide "
                          f"{where}.sample_batch_size={batch}; expected a divisor")
    skip, steps = out["skip_last_steps"], out["num_steps"]
    if skip >= steps:
        raise ParamsError(f"{source}: key '{origin['skip_last_steps']}.skip_last_steps': {skip} leaves no trained "
                          f"step for {where} (rl.common.num_steps={steps}); expected < num_steps")
    if out["eta"] <= 0:
        raise ParamsError(f"{source}: key 'rl.common.eta': {out['eta']}; DDPO needs a stochastic sampler (eta > 0)")
    return out


def validate_params(raw: dict[str, Any], *, source: str = "params.yaml", check_paths: bool = True) -> Params:
    """Validate a raw params dict; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = _loc(err)
            if err["type"] == "extra_forbidden":
                lines.append(f"{source}: unknown key '{key}'")
            elif err["type"] == "missing":
                lines.append(f"{source}: missing key '{key}'")
            else:
                got = err.get("input")
                hint = ""
                if isinstance(got, str) and err["type"] == "float_type":
                    hint = " (a quoted string; note PyYAML reads 1e-3 as a string: write 1.0e-3)"
                # a rejected URL may carry a password: never echo its userinfo
                lines.append(f"{source}: key '{key}': {err['msg']} (got {redact(repr(got))}){hint}")
        raise ParamsError("\n".join(lines)) from None
    for t in ("isic", "cxr"):
        rl_track_settings(params.rl.common, getattr(params.rl, t), name=t, source=source)
    for name, v in params.rl.cxr.variants.items():
        if v.prompt_repeats is not None:
            track = params.rl.cxr.model_copy(update={"prompt_repeats": v.prompt_repeats})
            rl_track_settings(params.rl.common, track, name=f"cxr.variants.{name}", source=source)
    if check_paths:
        flat = flatten(params.model_dump())
        for key in PATH_KEYS:
            value = flat.get(key)
            if value is not None and not Path(value).exists():
                raise ParamsError(f"{source}: key '{key}': path {value!r} does not exist")
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml", *, check_paths: bool = True) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    with path.open() as f:
        try:
            raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return validate_params(raw, source=str(path), check_paths=check_paths)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def select(params: Params, keys: list[str]) -> dict[str, Any]:
    """The sub-dict of params for the given dotted keys (each a leaf or a section)."""
    dumped = params.model_dump()
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = dumped
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"params.yaml: no key '{key}'")
            node = node[part]
        out[key] = node
    return out


def params_hash(values: dict[str, Any]) -> str:
    """Stable short hash of a params sub-dict (for MLflow tags)."""
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
