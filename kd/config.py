"""One configuration object for the CLI, the app's background jobs and torchrun alike.

A run is fully described by a `Config`; it is saved as `config.json` in the run folder so that
`--resume` and the model card know exactly what was trained.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kd import statefile
from kd.data import DEFAULT_VAL_FRACTION

SSL_METHODS = ("simclr", "byol", "moco")
TEACHER_TARGETS = ("online", "cached", "cached-tta")
OUTSIDE_FILLS = ("blur", "mean")  # what outside_reliance_weight's view shows outside the lungs
CONTRASTS = ("none", "equalize", "clahe")
THRESHOLD_RULES = ("youden", "sensitivity", "calibrated-0.5")
STUDENT_INITS = ("teacher-stem", "scratch")


PHASES = ("pretrain", "finetune", "distill", "baseline")  # a run's phases, in order (baseline: the labels-only student)
PROBE = "probe"  # the linear probe that opens fine-tuning (Config.probe_epochs): a part of the finetune phase
NO_CORPUS = ("no unlabeled folders: this preset pretrains only on a corpus beyond the labelled train images (on "
             "those alone SSL made the teacher worse)")
# the training commands (CLI, the app's jobs, torchrun) and the phases each runs: the one list of them. distill
# trains the labels-only twin too (unless cfg.baseline is off): without it a distillation cannot show it helped
PHASE_COMMANDS = {"pipeline": PHASES, "pretrain": ("pretrain",), "finetune": ("finetune",),
                  "distill": ("distill", "baseline")}


def builds_on(phases: tuple[str, ...]) -> str | None:
    """The phase whose weights the first of `phases` starts from (a run's own, or --from-run's); None for the
    first phase of a run (pretraining, or a whole pipeline)."""
    first = PHASES.index(phases[0])
    return PHASES[first - 1] if first > 0 else None


@dataclass
class PhaseConfig:
    """Budget and optimiser settings of one training phase."""

    epochs: int = 1
    image_size: int = 224
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5


@dataclass
class AugmentConfig:
    """Random view of a supervised batch (fine-tuning, distillation, the labels-only student).

    Each field is one lever of the recipe table (bench/recipes.md): the acquisition shift between
    Kermany's train and test children is in exposure, framing and sharpness, which these imitate."""

    scale_min: float = 0.7  # fraction of the image area kept by the crop (lower bound)
    scale_max: float = 1.0  # above 1: zoom out (the X-ray shrinks inside a black border)
    aspect: float = 0.0  # +- log aspect-ratio jitter (0.2 = up to 22 % wider or taller)
    rotation: float = 10.0  # degrees, +-
    translate: float = 0.06  # fraction of the image, +-
    brightness: float = 0.2  # additive, +-
    contrast_jitter: float = 0.2  # multiplicative, 1 +- (Config.contrast is the preprocessing's normalisation)
    gamma: float = 0.0  # +- log gamma (0.3 = gamma in [0.74, 1.35])
    blur: float = 0.0  # max Gaussian sigma in output pixels, drawn per image
    noise: float = 0.0  # max std of additive Gaussian noise, in [0, 1] pixel units
    # share of the images whose pixels outside the lung fields (kd.lungs, estimated per image) are replaced by a
    # heavy blur: the chest's outline stays, the detail of mediastinum, spine, diaphragm and film markers goes, so
    # the model must find its evidence in the lungs (a lever for heat maps on the lungs, issue 20)
    outside_lungs: float = 0.0


@dataclass
class Config:
    data: str = ""
    out: str = "runs/latest"
    preset: str = "cpu"
    seed: int = 0  # weights' initialisation, augmentation and batch order (per phase, kd.train.phase_seed)
    split_seed: int = 0  # the patient-level validation split: kept when `seed` changes, so seeds share validation
    device: str = "auto"  # auto | cpu | cuda
    # bf16 autocast in training steps on the CPU too (always on CUDA): 1.86x on this AVX512-BF16 CPU for
    # ResNet18 and ResNet50 at 128 px (bench/cpu_bf16.py); evaluation and export stay float32
    cpu_bf16: bool = False
    val_fraction: float = DEFAULT_VAL_FRACTION
    eval_image_size: int = 224  # the resolution the exported models see at inference (model card input size)
    ssl_method: str = "simclr"
    unlabeled: list[str] = field(default_factory=list)  # folders of X-rays without labels: SSL pretraining's corpus
    # SSL pretraining runs only where unlabeled folders add a corpus to the labelled train images: on Kermany's
    # 4,430 alone SimCLR made the teacher worse, on the 13,743 outside X-rays too it made it better (README).
    # Without them the pretraining phase is skipped and said so; False pretrains on whatever images there are
    pretrain_needs_unlabeled: bool = False
    # the labelled train images join the unlabeled folders in SSL pretraining; False pretrains on the folders alone
    # (the kNN probe still scores the labelled train split): on seed 0 that made the teacher worse (README), so True
    pretrain_labelled: bool = True
    # distillation's transfer set takes the unlabeled folders too: the student matches the teacher's outputs on
    # them, the label term only where there are labels (SimCLRv2's third step, Chen et al. 2020)
    distill_unlabeled: bool = False
    # teacher-stem: the student starts from the teacher's conv1/bn1 (the only layers whose shapes match);
    # scratch: random initialisation (the ablation of that seed)
    student_init: str = "teacher-stem"
    init: str = ""  # optional local weights file to start the teacher from (ImageNet, SwAV, ...)
    # a finished run folder whose teacher this run builds on: `distill` adopts its fine-tuned teacher (and that
    # teacher's pretraining), `finetune` its pretrained backbone; their weights and records are copied in, their
    # settings replace this config's (kd.pipeline.phases_to_adopt), so one folder says how its weights were made
    from_run: str = ""
    temperature: float = 4.0  # KD softening temperature T
    alpha: float = 0.5  # weight of the label cross-entropy; (1 - alpha) goes to the KD term
    hint_weight: float = 0.0  # FitNets feature hint (student layer4 -> teacher layer4); 0 = off
    # distillation adds this weight x the student's Grad-CAM mass (PNEUMONIA logit, on lung_cam_stage: the app's
    # default map) outside the image's lung fields (kd.lungs) less its mass inside, over the map's whole mass, the
    # map kept differentiable (kd.losses.lung_cam; GAIN, Li et al. 2018): a lever for heat maps on the lungs
    # (issue 20). 0 = off
    lung_cam_weight: float = 0.0
    lung_cam_stage: str = "layer2"
    # distillation adds this weight x the share of the student's input-gradient energy (of the PNEUMONIA logit
    # margin) outside the lung fields (kd.losses.lung_gradient; Ross et al. 2017): a lever on where the evidence
    # lies, not on how the map is drawn (issue 20). 0 = off
    lung_gradient_weight: float = 0.0
    # distillation adds this weight x the mean squared change of the student's PNEUMONIA logit margin when
    # everything outside the lung fields is replaced by occlusion's blurred fill, over the margin's variance in the
    # batch (kd.losses.outside_reliance): a lever on which regions the score needs, what occlusion and ROAD measure
    # (issue 20). Measured on a probe it moved the evidence further off the lungs (README "Which heat map"). 0 = off
    outside_reliance_weight: float = 0.0
    # blur: occlusion's fill (the outside's coarse brightness stays); mean: each image's mean (nothing of it stays)
    outside_reliance_fill: str = "blur"
    # online: the teacher sees each augmented view the student sees (Beyer et al. 2022, consistent teaching);
    # cached: the teacher's logits on the un-augmented image, computed once (cheaper, "fixed teacher");
    # cached-tta: the same, as the teacher's mean logit over kd.augment.TTA_VIEWS (7 framings, 7x the caching): on
    # validation the shipped teacher scored that way gains more AUC than the students do, on the test half neither
    # gains (bench/kd_transfer.py --tta, README): off in the presets
    teacher_targets: str = "online"
    # more fine-tuned teachers (teacher.safetensors files of other runs: other seeds of the same recipe) whose
    # logits are averaged with this run's teacher's into the cached distillation targets: an ensemble distilled
    # into one small model, the case Hinton et al. 2015 wrote distillation for. Needs teacher_targets "cached"
    extra_teachers: list[str] = field(default_factory=list)
    baseline: bool = True  # also train a labels-only student under the distillation budget (ablation)
    grad_clip: float = 1.0
    knn_k: int = 20
    max_knn_bank: int = 2000  # training images embedded for the SSL kNN probe
    # a seeded random subset of the training split (the validation split is carved first, whole): what keeps
    # the tiny preset tiny on the full dataset; None trains on all of it
    max_train_images: int | None = None
    fp16_weights: bool = True  # exported safetensors in float16 (halves the shipped size)
    cache_dir: str = ""  # decoded-image cache; default: <out>/../.cache
    contrast: str = "none"  # preprocessing in training, evaluation and the app: none | equalize | clahe
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_smoothing: float = 0.0  # of the label cross-entropy (supervised phases and KD's label term)
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = off); the EMA is what is exported
    # fine-tuning starts with this many epochs of a linear probe: only the teacher's head trains, on the frozen
    # pretrained features (BatchNorm statistics kept), at probe_lr; then every layer trains as before. LP-FT
    # (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution"):
    # a random head's first gradients no longer reshape the pretrained features. 0 = off
    probe_epochs: int = 0
    probe_lr: float = 1e-2
    bootstrap: int = 1000  # patient-bootstrap resamples behind the model card's confidence intervals
    threshold_rule: str = "youden"  # youden | sensitivity (>= min_sensitivity on validation) | calibrated-0.5
    min_sensitivity: float = 0.95
    pretrain: PhaseConfig = field(default_factory=PhaseConfig)
    finetune: PhaseConfig = field(default_factory=PhaseConfig)
    distill: PhaseConfig = field(default_factory=PhaseConfig)

    def phase(self, name: str) -> PhaseConfig:
        """Settings of a phase; the labels-only baseline student shares the distillation budget."""
        return self.distill if name == "baseline" else getattr(self, name)

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out).resolve().parent / ".cache"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A Config from its JSON object; ValueError naming the setting that is unknown or of the wrong type
        (a hand-edited config.json must not get as far as training, nor fail there with a traceback)."""
        try:
            return _from_json(cls, d, "it")
        except statefile.ShapeError as e:
            raise ValueError(f"configuration: {e}") from None

    def save(self, path: str | Path) -> None:
        from kd.checkpoint import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """The Config saved in `path`; statefile.UnreadableState (a ValueError) "unreadable: <file>, <why>"
        when the file is missing, not JSON, or holds settings of the wrong name or type."""
        value = statefile.read_json(path)
        try:
            return _from_json(cls, value, "it")
        except statefile.ShapeError as e:
            raise statefile.UnreadableState(path, str(e)) from None

    @property
    def skips_pretraining(self) -> bool:
        """No unlabeled folders where the pretraining needs them: the run starts at fine-tuning."""
        return self.pretrain_needs_unlabeled and not self.unlabeled

    def runnable_phases(self, phases: tuple[str, ...]) -> tuple[str, ...]:
        """`phases` less the pretraining this config skips; ValueError when pretraining alone was asked for."""
        if not (self.skips_pretraining and "pretrain" in phases):
            return phases
        if phases == ("pretrain",):
            raise ValueError(f"{NO_CORPUS}: give unlabeled folders (--unlabeled DIR ..., on the Train page the "
                             "unlabeled X-ray folders) to pretrain.")
        return tuple(p for p in phases if p != "pretrain")

    @property
    def cached_targets(self) -> bool:
        """The teacher's logits are computed once before distillation ("cached" or "cached-tta")."""
        return self.teacher_targets.startswith("cached")

    @property
    def lung_penalties(self) -> bool:
        """Any of distillation's issue-20 levers on where the student's evidence lies is on."""
        return self.lung_cam_weight > 0 or self.lung_gradient_weight > 0 or self.outside_reliance_weight > 0

    def validate(self) -> None:
        """Raise ValueError with a human message for settings that cannot train."""
        if self.ssl_method not in SSL_METHODS:
            raise ValueError(f"SSL method must be one of {', '.join(SSL_METHODS)}, not {self.ssl_method!r}")
        if self.teacher_targets not in TEACHER_TARGETS:
            raise ValueError(f"teacher targets must be one of {', '.join(TEACHER_TARGETS)}, not {self.teacher_targets!r}")
        if self.cached_targets and self.hint_weight > 0:
            raise ValueError("the FitNets hint needs the teacher's feature maps of each augmented view: "
                             "use teacher targets 'online' with a hint weight above 0")
        if self.extra_teachers and not self.cached_targets:
            raise ValueError("an ensemble of teachers is distilled through its averaged cached logits: "
                             "use teacher targets 'cached' or 'cached-tta' with extra_teachers")
        for path in self.extra_teachers:
            if not Path(path).is_file():
                raise ValueError(f"extra teacher weights not found: {path} (give the teacher.safetensors of a "
                                 "finished run)")
        if self.lung_cam_weight < 0 or self.lung_cam_stage not in ("layer1", "layer2", "layer3", "layer4"):
            raise ValueError(f"the lung heat-map penalty needs a weight >= 0 and a stage layer1-layer4 "
                             f"(got {self.lung_cam_weight}, {self.lung_cam_stage!r})")
        if self.lung_gradient_weight < 0:
            raise ValueError(f"the lung input-gradient penalty needs a weight >= 0 (got {self.lung_gradient_weight})")
        if self.outside_reliance_weight < 0:
            raise ValueError("the outside-the-lungs reliance penalty needs a weight >= 0 "
                             f"(got {self.outside_reliance_weight})")
        if self.outside_reliance_fill not in OUTSIDE_FILLS:
            raise ValueError(f"the outside-the-lungs fill must be one of {', '.join(OUTSIDE_FILLS)}, "
                             f"not {self.outside_reliance_fill!r}")
        if self.lung_penalties and self.hint_weight > 0:
            raise ValueError("the lung penalties and the FitNets hint are not combined: set hint_weight to 0, or "
                             "lung_cam_weight, lung_gradient_weight and outside_reliance_weight to 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1 (got {self.alpha})")
        if self.temperature <= 0:
            raise ValueError(f"temperature T must be positive (got {self.temperature})")
        if self.bootstrap < 10:
            raise ValueError(f"bootstrap needs at least 10 resamples for a confidence interval (got {self.bootstrap})")
        if self.max_train_images is not None and (not isinstance(self.max_train_images, int) or self.max_train_images < 4):
            raise ValueError(f"max_train_images must be at least 4, or None for the whole split (got {self.max_train_images})")
        if not 0.0 < self.val_fraction < 0.9:
            raise ValueError(f"val_fraction must be in (0, 0.9) (got {self.val_fraction})")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, not {self.contrast!r}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, not {self.threshold_rule!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1) (got {self.ema_decay})")
        if self.probe_epochs < 0 or self.probe_lr <= 0:
            raise ValueError(f"the linear probe needs epochs >= 0 and lr > 0 (got {self.probe_epochs}, {self.probe_lr})")
        a = self.augment
        if not 0.05 <= a.scale_min <= a.scale_max <= 2.0:
            raise ValueError(f"augment scale must satisfy 0.05 <= min <= max <= 2 (got {a.scale_min}, {a.scale_max})")
        if min(a.aspect, a.rotation, a.translate, a.brightness, a.contrast_jitter, a.gamma, a.blur, a.noise) < 0 or a.outside_lungs > 1:
            raise ValueError("augmentation strengths must be >= 0 (and outside_lungs, a share of the images, at most 1)")
        if self.from_run and not (Path(self.from_run) / "config.json").is_file():
            raise ValueError(f"--from-run {self.from_run}: not a run folder (no config.json there); give the folder "
                             "of a finished run")
        if not self.pretrain_labelled and not self.unlabeled and not self.skips_pretraining and self.pretrain.epochs:
            raise ValueError("pretraining without the labelled images needs unlabeled folders to pretrain on "
                             "(--unlabeled DIR ...)")
        if self.distill_unlabeled and not self.unlabeled:
            raise ValueError("distillation on unlabeled images needs unlabeled folders (--unlabeled DIR ...)")
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"student init must be one of {', '.join(STUDENT_INITS)}, not {self.student_init!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda (got {self.device!r})")
        for name in ("pretrain", "finetune", "distill"):
            p = self.phase(name)
            if p.epochs < 0 or p.batch_size < 2 or p.image_size < 16 or p.lr <= 0:
                raise ValueError(
                    f"{name}: epochs must be >= 0, batch size >= 2, image size >= 16 and lr > 0 "
                    f"(got epochs={p.epochs}, batch={p.batch_size}, size={p.image_size}, lr={p.lr})"
                )


# (settings class, the old name in saved config.json files and model cards) -> the name now: one word per meaning
RENAMED = {("AugmentConfig", "contrast"): "contrast_jitter"}


def _from_json(cls, value, what: str):
    """A settings dataclass (Config, PhaseConfig, AugmentConfig...) from a JSON object, by its field types:
    statefile.ShapeError names the first unknown key or value of the wrong type. Missing keys keep defaults."""
    statefile.expect(value, dict, what)
    value = {RENAMED.get((cls.__name__, k), k): v for k, v in value.items()}  # settings saved under an old name
    types = typing.get_type_hints(cls)
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise statefile.ShapeError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                                   + ("" if what == "it" else f" in {what}"))
    settings = {}
    for key, item in value.items():
        kind, where = types[key], statefile.child(what, key)
        if dataclasses.is_dataclass(kind):
            settings[key] = _from_json(kind, item, where)
        elif type(None) in typing.get_args(kind):  # `X | None`: null, or a value of X
            (inner,) = [t for t in typing.get_args(kind) if t is not type(None)]
            if item is not None:
                statefile.conform(item, statefile.NUMBER if inner is float else inner, where)
            settings[key] = item
        elif typing.get_origin(kind) is list:
            statefile.conform(item, statefile.list_of(typing.get_args(kind)[0]), where)
            settings[key] = list(item)
        else:
            statefile.conform(item, statefile.NUMBER if kind is float else kind, where)
            settings[key] = float(item) if kind is float else item
    return cls(**settings)


def _preset_tiny() -> Config:
    """32 px, one epoch a phase, 256 training images: a smoke test of the whole pipeline, not a model."""
    ph = dict(epochs=1, image_size=32, batch_size=8, warmup_epochs=0.0)
    return Config(
        preset="tiny", eval_image_size=32, max_knn_bank=64, bootstrap=100, max_train_images=256,
        pretrain=PhaseConfig(lr=1e-3, **ph), finetune=PhaseConfig(lr=1e-3, **ph), distill=PhaseConfig(lr=2e-3, **ph),
    )


GENERALISING_AUGMENT = AugmentConfig(scale_min=0.5, scale_max=1.1, aspect=0.15, rotation=10.0, gamma=0.25, blur=0.8,
                                     noise=0.02)


def _preset_cpu() -> Config:
    """The gpu preset's recipe at the 2-core CPU's budget, with SimCLR pretraining first where unlabeled folders
    give it a corpus (8 epochs at 64 px: on the 13,743 outside X-rays it made a better teacher, over seeds;
    without a corpus it is skipped); histogram equalisation, the stronger augmentation, 0.5 on the calibrated
    probability; fine-tuning and distillation at 128 px (what makes the budget), cached teacher logits for
    distillation and bf16 autocast on the CPU. Why each of these, with the measured figures: README ("Command
    line", "Benchmarks") and bench/recipes.md."""
    return Config(
        preset="cpu", eval_image_size=128, teacher_targets="cached", contrast="equalize", cpu_bf16=True,
        augment=dataclasses.replace(GENERALISING_AUGMENT), threshold_rule="calibrated-0.5",
        ssl_method="simclr", pretrain_needs_unlabeled=True,
        pretrain=PhaseConfig(epochs=8, image_size=64, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=1.0),
        finetune=PhaseConfig(epochs=6, image_size=128, batch_size=32, lr=1e-3, weight_decay=1e-4, warmup_epochs=0.3),
        distill=PhaseConfig(epochs=5, image_size=128, batch_size=32, lr=2e-3, weight_decay=1e-4, warmup_epochs=0.3),
    )


def _preset_gpu() -> Config:
    """The recipe the shipped weights come from (bench/recipes/gpu_shipped.json, chosen one lever at a time in
    bench/recipes.md): ResNet50 from scratch at 160 px with histogram equalisation and the stronger augmentation,
    distilled online into ResNet18, decisions at 0.5 on the calibrated probability; no SSL pretraining (see
    README for what it did)."""
    return Config(
        preset="gpu", eval_image_size=160, contrast="equalize", augment=dataclasses.replace(GENERALISING_AUGMENT),
        threshold_rule="calibrated-0.5",
        pretrain=PhaseConfig(epochs=0, image_size=128, batch_size=256, lr=2e-3, weight_decay=1e-4, warmup_epochs=2),
        finetune=PhaseConfig(epochs=14, image_size=160, batch_size=128, lr=1e-3, weight_decay=1e-4, warmup_epochs=1),
        distill=PhaseConfig(epochs=20, image_size=160, batch_size=128, lr=2e-3, weight_decay=1e-4, warmup_epochs=1),
    )


PRESETS = {"tiny": _preset_tiny, "cpu": _preset_cpu, "gpu": _preset_gpu}
DESCRIPTION = {  # what each preset costs: the one place the app and its messages take it from
    "tiny": "about a minute on a CPU; 256 training images at 32 px: a smoke test, not a model",
    "cpu": "about 15 minutes on an idle 2-core CPU with native bf16 (AVX512-BF16 or AMX), about an hour in float32 "
           "on one without; unlabeled folders add SimCLR pretraining on them first (about 40 minutes more for "
           "18,000 images with bf16, about 90 in float32)",
    "gpu": "about 3 minutes of training on one H100/H200",
}


def preset(name: str, **overrides) -> Config:
    """A preset with overrides; `image_size` / `epochs` / `batch_size` apply to every phase."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    for key in ("image_size", "epochs", "batch_size"):
        value = overrides.pop(key, None)
        if value is not None:
            for ph in ("pretrain", "finetune", "distill"):
                setattr(cfg.phase(ph), key, value)
            if key == "image_size":
                cfg.eval_image_size = value
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(cfg, key):
            raise ValueError(f"Unknown setting {key!r}")
        setattr(cfg, key, value)
    cfg.validate()
    return cfg
