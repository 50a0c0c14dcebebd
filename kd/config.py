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

PHASES = ("pretrain", "finetune", "distill", "baseline")
SSL_METHODS = ("simclr", "byol")
TEACHER_TARGETS = ("online", "cached")


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
class Config:
    data: str = ""
    out: str = "runs/latest"
    preset: str = "cpu"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    val_fraction: float = 0.15
    eval_image_size: int = 224  # the resolution the exported models see at inference (model card input size)
    ssl_method: str = "simclr"
    unlabeled: list[str] = field(default_factory=list)
    init: str = ""  # optional local weights file to start the teacher from (ImageNet, SwAV, ...)
    temperature: float = 4.0  # KD softening temperature T
    alpha: float = 0.5  # weight of the label cross-entropy; (1 - alpha) goes to the KD term
    hint_weight: float = 0.0  # FitNets feature hint (student layer4 -> teacher layer4); 0 = off
    # online: the teacher sees each augmented view the student sees (Beyer et al. 2022, consistent teaching);
    # cached: the teacher's logits on the un-augmented image, computed once (cheaper, "fixed teacher")
    teacher_targets: str = "online"
    baseline: bool = True  # also train a labels-only student under the distillation budget (ablation)
    grad_clip: float = 1.0
    knn_k: int = 20
    max_knn_bank: int = 2000  # training images embedded for the SSL kNN probe
    fp16_weights: bool = True  # exported safetensors in float16 (halves the shipped size)
    cache_dir: str = ""  # decoded-image cache; default: <out>/../.cache
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

    def validate(self) -> None:
        """Raise ValueError with a human message for settings that cannot train."""
        if self.ssl_method not in SSL_METHODS:
            raise ValueError(f"SSL method must be one of {', '.join(SSL_METHODS)}, not {self.ssl_method!r}")
        if self.teacher_targets not in TEACHER_TARGETS:
            raise ValueError(f"teacher targets must be one of {', '.join(TEACHER_TARGETS)}, not {self.teacher_targets!r}")
        if self.teacher_targets == "cached" and self.hint_weight > 0:
            raise ValueError("the FitNets hint needs the teacher's feature maps of each augmented view: "
                             "use teacher targets 'online' with a hint weight above 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1 (got {self.alpha})")
        if self.temperature <= 0:
            raise ValueError(f"temperature T must be positive (got {self.temperature})")
        if not 0.0 < self.val_fraction < 0.9:
            raise ValueError(f"val_fraction must be in (0, 0.9) (got {self.val_fraction})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda (got {self.device!r})")
        for name in ("pretrain", "finetune", "distill"):
            p = self.phase(name)
            if p.epochs < 0 or p.batch_size < 2 or p.image_size < 16 or p.lr <= 0:
                raise ValueError(
                    f"{name}: epochs must be >= 0, batch size >= 2, image size >= 16 and lr > 0 "
                    f"(got epochs={p.epochs}, batch={p.batch_size}, size={p.image_size}, lr={p.lr})"
                )


def _from_json(cls, value, what: str):
    """A settings dataclass (Config, PhaseConfig, AugmentConfig...) from a JSON object, by its field types:
    statefile.ShapeError names the first unknown key or value of the wrong type. Missing keys keep defaults."""
    statefile.expect(value, dict, what)
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
        elif typing.get_origin(kind) is list:
            statefile.conform(item, statefile.list_of(typing.get_args(kind)[0]), where)
            settings[key] = list(item)
        else:
            statefile.conform(item, statefile.NUMBER if kind is float else kind, where)
            settings[key] = float(item) if kind is float else item
    return cls(**settings)


def _preset_tiny() -> Config:
    """Seconds on a CPU at 32 px: for tests and smoke runs, not for accuracy."""
    ph = dict(epochs=1, image_size=32, batch_size=8, warmup_epochs=0.0)
    return Config(
        preset="tiny", eval_image_size=32, max_knn_bank=64,
        pretrain=PhaseConfig(lr=1e-3, **ph), finetune=PhaseConfig(lr=1e-3, **ph), distill=PhaseConfig(lr=2e-3, **ph),
    )


def _preset_cpu() -> Config:
    """About 45 minutes on an idle 2-core CPU: SSL at 96 px, fine-tuning and distillation at 128 px,
    served at 128 px too (lower resolution is what makes the budget: 3.8x less training time than
    224 px; serving these models at 224 px instead cost 0.01-0.03 validation AUC and 2-3x the latency,
    see bench/resolution.py). Sized to finish inside one working session while other work shares the machine.

    Distillation uses cached teacher logits: at this 3-epoch budget and 128 px they gave the same
    validation AUC as the online teacher (+0.0016, paired 95% CI -0.0001 to +0.0035) at 1.35x the speed
    (bench/teacher_cache.py). The gpu preset keeps the online teacher for its long schedule."""
    return Config(
        preset="cpu", eval_image_size=128, teacher_targets="cached",
        pretrain=PhaseConfig(epochs=3, image_size=96, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=0.5),
        finetune=PhaseConfig(epochs=3, image_size=128, batch_size=32, lr=1e-3, weight_decay=1e-4, warmup_epochs=0.3),
        distill=PhaseConfig(epochs=3, image_size=128, batch_size=32, lr=2e-3, weight_decay=1e-4, warmup_epochs=0.3),
    )


def _preset_gpu() -> Config:
    """One H100, about 10 minutes: full-resolution SSL and longer schedules."""
    return Config(
        preset="gpu", eval_image_size=224,
        pretrain=PhaseConfig(epochs=60, image_size=224, batch_size=256, lr=2e-3, weight_decay=1e-4, warmup_epochs=3),
        finetune=PhaseConfig(epochs=20, image_size=224, batch_size=128, lr=5e-4, weight_decay=1e-4, warmup_epochs=1),
        distill=PhaseConfig(epochs=30, image_size=224, batch_size=128, lr=2e-3, weight_decay=1e-4, warmup_epochs=1),
    )


PRESETS = {"tiny": _preset_tiny, "cpu": _preset_cpu, "gpu": _preset_gpu}


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
