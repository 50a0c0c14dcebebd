"""The model card shipped next to the weights: what was trained, on what, how well, and where the
decision threshold comes from. The app and `kd evaluate` read the threshold and normalisation here."""
from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
from pathlib import Path

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from kd import preprocess, statefile
from kd.data import DEFAULT_VAL_FRACTION, Sample, split_settings
from kd.models import ARCHITECTURES
from kd.statefile import (OPTIONAL_NUMBER, ShapeError, UnreadableState, conform, expect, finite, list_of, nullable,
                          one_of)

CARD_FILE = "model_card.json"
DISCLAIMER = ("Research tool, not a diagnostic device: not cleared for clinical use; every output must be "
              "reviewed by a qualified clinician.")
INTENDED_USE = ("Made for frontal (anterior-posterior) chest X-rays of children aged one to five, the kind it learnt "
                "from (Kermany et al. 2018: Guangzhou Women and Children's Medical Center); adults, lateral views and "
                "other body parts were never tested.")


def data_fingerprint(samples: list[Sample]) -> str:
    """Hash of the training file names and sizes: two runs on the same data share it."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: Path(s.path).name):
        h.update(f"{Path(s.path).name}:{os.path.getsize(s.path)}:{s.label};".encode())
    return h.hexdigest()[:16]


SPLIT_HASHES_FILE = "split_hashes.json"  # content hashes of the images the weights were trained and selected on
HASH_CHARS = 16  # of kd.data.content_hash's hex digest: 64 bits, no collision among a dataset's images


def write_split_hashes(weights_dir: str | Path, splits: dict[str, list[Sample]]) -> Path:
    """The weights' own training and validation images, by content, next to the weights: Evaluate warns when a
    folder it is asked to judge holds them (figures on training images say nothing about new patients)."""
    from kd.checkpoint import write_json_atomic
    from kd.data import content_hash

    hashes = {split: sorted({content_hash(s.path)[:HASH_CHARS] for s in splits[split]}) for split in ("train", "val")}
    path = Path(weights_dir) / SPLIT_HASHES_FILE
    write_json_atomic(path, {"hash": f"blake2b-128 of the file's bytes, first {HASH_CHARS} hex digits", **hashes})
    return path


def split_overlap(weights_dir: str | Path, paths: list[str]) -> dict | None:
    """How many of `paths` are the weights' training and validation images (by content); None when the weights
    do not list theirs (exported before SPLIT_HASHES_FILE existed) or the list cannot be read."""
    from kd import statefile
    from kd.data import content_hash

    try:
        known = statefile.read_json(Path(weights_dir) / SPLIT_HASHES_FILE,
                                    statefile.object_with({"train": statefile.list_of(str), "val": statefile.list_of(str)}),
                                    default=None)
    except statefile.UnreadableState:
        return None
    if known is None:
        return None
    mine = [content_hash(p)[:HASH_CHARS] for p in paths]
    sets = {split: set(known[split]) for split in ("train", "val")}
    return {"n": len(mine), **{split: sum(h in sets[split] for h in mine) for split in ("train", "val")}}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def base_card(input_size: int, contrast: str = "none") -> dict:
    return {
        "disclaimer": DISCLAIMER,
        "intended_use": INTENDED_USE,
        "task": "pneumonia vs normal on pediatric chest X-rays (Kermany et al. 2018)",
        "classes": ["NORMAL", "PNEUMONIA"],
        "positive_class": "PNEUMONIA",
        "input": {"channels": 1, "size": input_size, "resize": "whole image stretched to a square (aspect not kept)",
                  "contrast": contrast, "mean": preprocess.MEAN, "std": preprocess.STD, "scale": "pixel / 255",
                  "preprocess_version": preprocess.PREPROCESS_VERSION},
        "models": {role: {"architecture": arch, "file": f"{role}.safetensors"} for role, arch in ARCHITECTURES.items()},
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _interval(value, what: str = "it") -> None:
    """A confidence interval: [low, high] (null ends where a bootstrap had one class only)."""
    list_of(OPTIONAL_NUMBER)(value, what)
    if len(value) != 2:
        raise ShapeError(f"{what} must be a [low, high] pair, not {len(value)} value(s)")


def weights_file_name(value, what: str = "it") -> None:
    """A weights file the card names: a plain .safetensors name inside the card's own folder (no '../', no
    absolute path, no folder), so a card cannot make the app load a file from elsewhere."""
    expect(value, str, what)
    if value != Path(value).name or value in ("", ".", "..") or "\\" in value or not value.endswith(".safetensors"):
        raise ShapeError(f"{what} must be a .safetensors file name in the weights folder, not {value!r}")


def _input_size(value, what: str = "it") -> None:
    expect(value, int, what)
    if not 16 <= value <= 2048:
        raise ShapeError(f"{what} must be between 16 and 2048 pixels, not {value}")


# ----------------------------------------------------------------------------- the card's schema (pydantic)


def _check(spec):
    """A field validator from a kd.statefile check: JSON's own types (true is not a number, "0.5" is not a number),
    finite numbers, allow-lists; its phrase becomes the field's message (read_card names the field)."""
    def validate(value):
        try:
            conform(value, spec, "it")
        except ShapeError as e:
            raise PydanticCustomError("card_field", "{why}", {"why": str(e).removeprefix("it ")}) from None
        return value
    return BeforeValidator(validate)


_POSITIVE = finite(0.0, low_open=True)
Number = Annotated[float, _check(finite())]  # a NaN threshold makes every decision NORMAL: finite, always
Count = Annotated[int, _check(int)]
Text = Annotated[str, _check(str)]
Interval = Annotated[list, _check(nullable(_interval))]
Positive = Annotated[float, _check(_POSITIVE)]


class _Section(BaseModel):
    """A part of the card: the fields readers use are typed; anything else a card holds is kept as written."""

    model_config = ConfigDict(extra="allow")


class Report(_Section):
    """One model's metrics on one split (kd.evaluate.model_report)."""

    auc: Number | None = None
    accuracy: Number | None = None
    sensitivity: Number | None = None
    specificity: Number | None = None
    precision: Number | None = None
    f1: Number | None = None
    threshold: Number | None = None
    n: Count | None = None
    n_positive: Count | None = None
    n_negative: Count | None = None
    ci: dict[str, Interval | None] = {}
    confusion_matrix: dict[str, Count] | None = None
    roc: dict | None = None
    calibration: dict | None = None


class ModelEntry(_Section):
    """One network of the card: what to build, which file holds it, and its decision threshold."""

    architecture: Annotated[str, _check(one_of(tuple(sorted(set(ARCHITECTURES.values())))))]  # kd.models.build's
    file: Annotated[str, _check(weights_file_name)] | None = None
    threshold: Annotated[float, _check(finite(0.0, 1.0))] = 0.5  # on the calibrated probability
    threshold_rule: Text | None = None
    calibration_temperature: Positive = 1.0  # p = softmax(logits / it); not the distillation temperature
    temperature: Positive | None = None
    parameters: Count | None = None
    cpu_ms_per_image: Number | None = None
    validation: Report | None = None
    test: Report | None = None


class InputSpec(_Section):
    """What the models take: the square's size, its contrast normalisation and the pixel standardisation."""

    size: Annotated[int, _check(_input_size)]
    contrast: Annotated[str, _check(one_of(preprocess.CONTRASTS))] = "none"
    mean: Number = preprocess.MEAN
    std: Positive = preprocess.STD


class RunSettings(_Section):
    """The run's config.json as the card keeps it; typed: what the readers carve the validation split with."""

    val_fraction: Annotated[float, _check(finite(0.0, 0.9, low_open=True))] = DEFAULT_VAL_FRACTION
    split_seed: Count | None = None  # configs written before it existed carved the split with `seed`
    seed: Count = 0
    threshold_rule: Text = "youden"  # how the thresholds were chosen on validation (cards before it: Youden's J)
    min_sensitivity: Annotated[float, _check(finite(0.0, 1.0))] = 0.95

    @property
    def split(self) -> tuple[float, int]:
        """(val_fraction, split seed) of the weights' patient-level validation split: kd.data.split_settings' rule."""
        return split_settings(self.model_dump(exclude_unset=True))


class ModelCard(_Section):
    """The model card: one schema for writing it (write_card) and reading it (read_card)."""

    input: InputSpec
    models: dict[str, ModelEntry]
    disclaimer: Text | None = None
    intended_use: Text | None = None
    date: Text | None = None
    reproduce: Text | None = None
    metrics_split: dict[str, Text] | None = None
    config: RunSettings = RunSettings()
    wall_time_s: dict[str, Number] | None = None

    @model_validator(mode="after")
    def _served_models_have_files(self):
        for role in ("teacher", "student"):
            if role in self.models and self.models[role].file is None:
                raise PydanticCustomError("card_field", "models.{role}.file: a served model needs its weights file",
                                          {"role": role})
        return self

    @property
    def document(self) -> dict:
        """The card as JSON, as it was written (what the app shows and its tables read)."""
        return self.model_dump(mode="json", exclude_unset=True)


def _why(error: dict) -> str:
    """One pydantic error as read_card says it: the field's dotted name, then what is wrong with it."""
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        *parent, key = error["loc"]
        return f"{'.'.join(map(str, parent))!r} has no {key!r}" if parent else f"it has no {key!r}"
    if error["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return f"{where!r} must be a JSON object, not {statefile.show(error['input'])}"
    message = error["msg"] if error["type"] == "card_field" else f"is not usable ({error['msg']})"
    return f"{where!r} {message}" if where else message


def card_from(document: dict, path: str | Path = CARD_FILE) -> ModelCard:
    """A card's JSON document as a ModelCard; statefile.UnreadableState naming the first bad field."""
    try:
        expect(document, dict, "it")
        return ModelCard.model_validate(document)
    except ShapeError as e:
        raise UnreadableState(path, str(e)) from None
    except ValidationError as e:
        raise UnreadableState(path, _why(e.errors()[0])) from None


def read_card(weights_dir: str | Path) -> ModelCard:
    """The model card of a weights folder; statefile.UnreadableState (a ValueError) when it is missing or
    not of the shape its readers rely on."""
    path = Path(weights_dir) / CARD_FILE
    return card_from(statefile.read_json(path), path)


def write_card(weights_dir: str | Path, document: dict) -> ModelCard:
    """Check a card against the schema, then write it atomically: a card that read_card would refuse is never
    written (the export and the refusal check's fitting both come here)."""
    from kd.checkpoint import write_json_atomic

    path = Path(weights_dir) / CARD_FILE
    card = card_from(document, path)
    write_json_atomic(path, card.document)
    return card


REPORTED_SPLITS = ("validation", "test")  # what a card reports, side by side; test only when the data had one


def split_rows(card: dict, roles=None) -> list[dict]:  # card: ModelCard.document
    """One row per model and reported split: AUC and its 95% CI, accuracy, sensitivity and specificity at
    the model's threshold, and the number of images (the CLI summary and the app's card tables)."""
    rows = []
    for role, m in card.get("models", {}).items():
        if roles is not None and role not in roles:
            continue
        for split in REPORTED_SPLITS:
            r = m.get(split)
            if r:
                lo, hi = ((r.get("ci") or {}).get("auc") or [None, None])[:2]
                rows.append({"role": role, "split": split, "auc": r.get("auc"), "auc_low": lo, "auc_high": hi,
                             **{k: r.get(k) for k in ("accuracy", "sensitivity", "specificity", "n")},
                             "threshold": r.get("threshold", m.get("threshold", 0.5))})
    return rows
