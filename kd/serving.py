"""The served weights and everything done with them: loading a weights folder (teacher, student, model card,
refusal check), the decision rule, and an upload's way from bytes to a decision: `diagnose` (the app: both
probabilities and both heat maps) and `predict_bytes` / `predict_files` (`kd predict`). Whole image sets are scored
by kd.scoring and kd.evaluate; the heat maps themselves are kd.cam's.

The walk of one upload, downward: bytes -> kd.preprocess (decoded once) -> the teacher's heat-map forward pass, whose
own layer3 output is the refusal check's and the framing warnings' input (kd.ood, kd.framing: no second teacher pass)
-> the rest of that pass and its backward (kd.cam) -> the student's -> a Diagnosis."""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from kd import cam, preprocess
from kd.checkpoint import CheckpointError, file_in_folder, load_weights
from kd.framing import STAGE as FRAMING_STAGE
from kd.framing import FramingCheck
from kd.framing import load as load_framing
from kd.lungs import in_lung_share, lung_mask
from kd.metrics import is_pneumonia, softmax_pneumonia
from kd.model_card import CARD_FILE, ModelCard, read_card
from kd.models import build
from kd.ood import REASON_END, OODCheck, file_sha256, stage_maps
from kd.ood import load as load_ood
from kd.paths import default_weights

ROLES = ("teacher", "student")
DISPLAY_SIZE = cam.DISPLAY_SIZE  # px (at least) of the picture the heat maps are drawn on


@dataclass
class LoadedModel:
    role: str
    model: nn.Module
    threshold: float  # on the calibrated probability
    calibration_temperature: float = 1.0  # p = softmax(logits / calibration_temperature); not the distillation T
    lock: threading.Lock = field(default_factory=threading.Lock)  # hooks and autograd state are per model


@dataclass
class ModelPair:
    """Teacher and student from one weights folder, with their model card."""

    card: ModelCard
    models: dict[str, LoadedModel]
    weights_dir: Path
    ood: OODCheck | None = None  # kd.ood: refuses what is not a chest radiograph; None when not fitted
    framing: FramingCheck | None = None  # kd.framing: warns of crops, zooms, mirror images, turned ones; None when not fitted

    @property
    def input_size(self) -> int:
        return self.card.input.size

    @property
    def contrast(self) -> str:
        """Contrast normalisation the models were trained with (kd.preprocess.apply_contrast)."""
        return self.card.input.contrast

    def prepare(self, data: bytes, name: str = "upload"):
        """Bytes -> (model square, XRay) exactly as the training cache prepared its images."""
        return preprocess.prepare(data, self.input_size, name, self.contrast)


def load_pair(weights_dir: str | Path | None = None, ood: bool = True) -> ModelPair:
    """Build both architectures from the card and load their safetensors (CPU, eval, channels_last), and
    the out-of-distribution check fitted for them when the folder has one (`ood=False`: not even then)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else default_weights()
    if not (weights_dir / CARD_FILE).exists():
        raise CheckpointError(f"No {CARD_FILE} in {weights_dir}: not a weights folder (run `python -m kd pipeline` "
                              f"or point to a folder with teacher.safetensors, student.safetensors, {CARD_FILE}).")
    card = read_card(weights_dir)
    models = {}
    for role in ROLES:
        info = card.models[role]
        model = load_weights(build(info.architecture), file_in_folder(weights_dir, info.file)).eval()
        model = model.to(memory_format=torch.channels_last)
        models[role] = LoadedModel(role, model, info.threshold, info.calibration_temperature)
    teacher_file = file_in_folder(weights_dir, card.models["teacher"].file)
    check = load_ood(weights_dir, teacher_file) if ood else None
    framing = load_framing(weights_dir, file_sha256(teacher_file)) if ood else None
    return ModelPair(card, models, weights_dir, check, framing)


def no_check_reason(weights_dir: str | Path) -> str:
    """Why nothing is predicted with weights that have no fitted out-of-distribution check (kd.ood)."""
    return (f"The weights in {weights_dir} have no fitted out-of-distribution check, so nothing tells a chest X-ray "
            f"from any other picture (a photograph gets a confident probability too){REASON_END[:-1]} until it is "
            f"fitted: `python -m kd fit-ood --weights {weights_dir} --data DATA` (every run exported by this "
            "version fits it itself).")


def decide(probability: float, threshold: float) -> str:
    """The decision rule, on the calibrated probability of pneumonia."""
    return "PNEUMONIA" if is_pneumonia(probability, threshold) else "NORMAL"


class NotChestXray(preprocess.ImageError):
    """A readable picture refused by the out-of-distribution check (kd.ood): no probability is given."""


# ------------------------------------------------------------------ the refusal check and the framing warnings


def _screen(pair: ModelPair, squares: np.ndarray, maps: torch.Tensor | None) -> tuple[list, list]:
    """screen_squares without taking the teacher's lock (the caller holds it)."""
    refusals = pair.ood.reasons(pair.models["teacher"].model, squares, maps)
    warnings = [()] * len(squares)
    kept = [i for i, why in enumerate(refusals) if why is None]
    if pair.framing is not None and kept:
        chosen = maps[kept] if maps is not None else None
        for i, w in zip(kept, pair.framing.warnings(pair.models["teacher"].model, squares[kept], chosen)):
            warnings[i] = w
    return refusals, warnings


def _shares_stage(pair: ModelPair) -> bool:
    """Whether the refusal check reads the stage the framing warnings read (then one teacher map feeds both)."""
    return pair.ood is not None and pair.ood.stage == FRAMING_STAGE


@torch.inference_mode()
def screen_squares(pair: ModelPair, squares: np.ndarray,
                   maps: torch.Tensor | None = None) -> tuple[list[str | None], list[tuple[str, ...]]]:
    """Before any probability, for each square of [N, S, S]: why it is refused (kd.ood; None when it is not) and
    the framing warnings of those not refused (kd.framing). Both read the teacher's layer3 map: `maps` when the
    caller has it from a pass of its own, else computed once here for the two."""
    if pair.ood is None:  # without the check no picture is known to be an X-ray: no bare probability
        return [no_check_reason(pair.weights_dir)] * len(squares), [()] * len(squares)
    if not len(squares):
        return [], []
    teacher = pair.models["teacher"]
    with teacher.lock:
        if maps is None and _shares_stage(pair) and pair.framing is not None:
            maps = torch.cat(list(stage_maps(teacher.model, squares, FRAMING_STAGE)))
        return _screen(pair, squares, maps)


def screen(pair: ModelPair, square: np.ndarray, xray: preprocess.XRay) -> preprocess.XRay:
    """screen_squares for one square: NotChestXray when it is refused, else the X-ray with the framing warnings
    added to its own (the decoder's notes)."""
    [refusal], [extra] = screen_squares(pair, square[None])
    if refusal:
        raise NotChestXray(refusal)
    return dataclasses.replace(xray, warnings=tuple(xray.warnings) + extra) if extra else xray


# ------------------------------------------------------------------ probabilities (kd predict)


@torch.inference_mode()
def predict_squares(pair: ModelPair, squares: np.ndarray) -> list[dict[str, dict]]:
    """Probability of pneumonia and decision of each model for each preprocessed square of [N, S, S], in one
    batched forward pass per model (`seconds`: the pass's time shared out per image). No check: see checked."""
    return _predictions(pair, squares, {})


def _predictions(pair: ModelPair, squares: np.ndarray, done: dict) -> list[dict[str, dict]]:
    """predict_squares, with `done` {role: (logits, seconds)} of the models already run on these squares."""
    x = preprocess.normalize(torch.from_numpy(np.array(squares)))[:, None]  # a copy: squares may be read-only
    x = x.contiguous(memory_format=torch.channels_last)
    out: list[dict[str, dict]] = [{} for _ in range(len(squares))]
    for role, m in pair.models.items():
        if role in done:
            logits, spent = done[role]
        else:
            t0 = time.perf_counter()
            with m.lock:
                logits = m.model(x).float().numpy()
            spent = time.perf_counter() - t0
        p = softmax_pneumonia(logits, m.calibration_temperature)
        each = spent / max(1, len(squares))
        for i, value in enumerate(p.tolist()):
            out[i][role] = {"probability": value, "decision": decide(value, m.threshold), "threshold": m.threshold,
                            "seconds": each}
    return out


@torch.inference_mode()
def checked(pair: ModelPair, squares: np.ndarray) -> tuple[list[str | None], list[tuple[str, ...]], list[dict | None]]:
    """For each square of [N, S, S]: why it is refused (None when it is not), its framing warnings, and its
    predictions (None when refused). The teacher's forward pass over the batch gives both its layer3 map (the
    checks' input) and its logits, so the check costs no teacher pass of its own; the student runs on the kept
    squares only. Weights whose checks read other stages screen on a pass of their own first (screen_squares)."""
    if pair.ood is None or not _shares_stage(pair) or not len(squares):
        return checked_apart(pair, squares)
    teacher = pair.models["teacher"]
    x = preprocess.normalize(torch.from_numpy(np.array(squares)))[:, None].contiguous(memory_format=torch.channels_last)
    maps = []
    with teacher.lock:
        t0 = time.perf_counter()
        handle = getattr(teacher.model, FRAMING_STAGE).register_forward_hook(lambda m, i, out: maps.append(out.float()))
        try:
            logits = teacher.model(x).float().numpy()
        finally:
            handle.remove()
        spent = time.perf_counter() - t0
        refusals, warnings = _screen(pair, squares, maps[0])
    kept = [i for i, why in enumerate(refusals) if why is None]
    found = dict(zip(kept, _predictions(pair, squares[kept], {"teacher": (logits[kept], spent * len(kept) / len(squares))})
                     )) if kept else {}
    return refusals, warnings, [found.get(i) for i in range(len(squares))]


def checked_apart(pair: ModelPair, squares: np.ndarray) -> tuple[list, list, list[dict | None]]:
    """`checked` with the checks on a teacher pass of their own (screen_squares), then a forward per model: for
    weights whose checks read another stage, and the baseline bench/predict_bulk.py times `checked` against."""
    refusals, warnings = screen_squares(pair, squares)
    kept = [i for i, why in enumerate(refusals) if why is None]
    found = dict(zip(kept, predict_squares(pair, squares[kept]))) if kept else {}
    return refusals, warnings, [found.get(i) for i in range(len(squares))]


def predict_bytes(pair: ModelPair, data: bytes, name: str = "upload") -> dict:
    """Decode, preprocess, check it is a chest radiograph (checked) and predict; raises preprocess.ImageError
    (NotChestXray for a refusal) with a human message."""
    square, xray = pair.prepare(data, name)
    [refusal], [extra], [found] = checked(pair, square[None])
    if refusal:
        raise NotChestXray(refusal)
    return {"file": name, **found, "warnings": list(xray.warnings) + list(extra)}


def predict_files(pair: ModelPair, paths: list[str], batch_size: int = 16, workers: int = 2):
    """`predict_bytes` for many files, in their order: (path, result or None, error message or None) each.

    Decoding runs in `workers` threads (Pillow releases the GIL) one batch ahead of the models, and each batch goes
    through `checked`: one teacher pass for the checks and its probabilities, one student pass for the kept."""
    def read(path: str):
        try:
            square, xray = pair.prepare(Path(path).read_bytes(), Path(path).name)
            return path, square, xray, None
        except (OSError, preprocess.ImageError) as e:
            return path, None, None, e.strerror if isinstance(e, OSError) and e.strerror else str(e)

    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending = [pool.submit(read, p) for p in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            decoded = [f.result() for f in pending]
            pending = [pool.submit(read, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            readable = [d for d in decoded if d[1] is not None]
            refusals, framing, results = checked(pair, np.stack([d[1] for d in readable])) if readable else ([], [], [])
            i = -1  # position among the readable files of this batch
            for path, square, xray, error in decoded:
                if error is not None:
                    yield path, None, error
                    continue
                i += 1
                if refusals[i] is not None:
                    yield path, None, refusals[i]
                else:
                    yield path, {"file": Path(path).name, **results[i],
                                 "warnings": list(xray.warnings) + list(framing[i])}, None


# ------------------------------------------------------------------ diagnosis (the app): decisions and heat maps


@dataclass
class ModelView:
    probability: float
    decision: str
    threshold: float
    cam: np.ndarray  # the app draws it over Diagnosis.picture at the opacity chosen (kd.cam.overlay)
    seconds: float
    in_lungs: float | None = None  # share of the map's mass on Diagnosis.lungs (kd.lungs.in_lung_share); None: empty


@dataclass
class Screened:
    """An upload decoded once and let through the refusal check: what every heat map of it is drawn from."""

    square: np.ndarray  # what the models see (uint8, size x size)
    xray: preprocess.XRay  # with the decoder's and the framing check's warnings
    picture: np.ndarray  # the same X-ray at display resolution, under the overlays
    seconds: dict[str, float]  # "decoding", "refusal check"
    # the estimated lung fields on `square` (kd.lungs.lung_mask): estimated once per upload, not per heat-map method
    lungs: np.ndarray | None = None

    def __post_init__(self):
        if self.lungs is None:
            self.lungs = lung_mask(self.square)


@dataclass
class Diagnosis:
    square: np.ndarray  # what the models saw (uint8, size x size)
    xray: preprocess.XRay | None
    views: dict[str, ModelView]
    agreement: dict[str, float]
    picture: np.ndarray  # the same X-ray at display resolution, under the overlays
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went: decoding, check, each model
    # the estimated lung fields on `square` (kd.lungs.lung_mask): where a map that reads the lungs should lie
    lungs: np.ndarray | None = None

    @property
    def same_decision(self) -> bool:
        return len({v.decision for v in self.views.values()}) == 1

    @property
    def screened(self) -> Screened:
        """What a change of heat-map method starts from (diagnose_screened): nothing of it is computed again."""
        return Screened(self.square, self.xray, self.picture,
                        {k: v for k, v in self.seconds.items() if k in ("decoding", "refusal check")}, self.lungs)


def display_picture(pixels: np.ndarray, size: int) -> np.ndarray:
    """The X-ray as shown under the heat maps: at its own aspect ratio, the longest side max(size,
    DISPLAY_SIZE) px. (The model saw it stretched to a square, as in training; kd.cam.overlay resizes the map
    back onto this picture.)"""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise TypeError(f"expected a 2-D uint8 array, got {pixels.dtype} with shape {pixels.shape}")
    longest = max(size, DISPLAY_SIZE)
    h, w = pixels.shape
    scale = longest / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize(shape, Image.Resampling.BILINEAR))


def display_pixels(pair: ModelPair, data: bytes, name: str, xray: preprocess.XRay) -> np.ndarray:
    """The decoded pixels the display picture is made from: the models' own decoding, except for a JPEG that
    libjpeg decoded reduced (draft) for the model's size, which is decoded again at the display size so the picture
    a clinician reads stays sharp (and exactly as it was). Every other file decodes to the same pixels at either
    size (kd.preprocess: only JPEG's draft depends on the size asked for), so reusing them changes nothing."""
    h, w = xray.pixels.shape
    if xray.source == "JPEG" and max(h, w) < max(xray.original_size):
        return preprocess.load_xray(data, name=name, target_size=max(pair.input_size, DISPLAY_SIZE)).pixels
    return xray.pixels


class _Refused(Exception):
    """Raised inside the teacher's forward pass to stop it (no layer4, no backward) when the check refuses."""

    def __init__(self, maps: torch.Tensor):
        super().__init__("refused")
        self.maps = maps


def diagnose(pair: ModelPair, data: bytes, name: str = "upload", method: str = cam.DEFAULT_CAM) -> Diagnosis:
    """Bytes of an upload -> both predictions and both heat maps, or NotChestXray / preprocess.ImageError.

    The bytes are decoded once (display_pixels says when a JPEG's picture needs its own decode), and the refusal
    check reads the teacher's layer3 map from the heat map's forward pass itself: a refused picture stops that pass
    there, before any probability, and an accepted one costs no separate teacher pass for the check."""
    if pair.ood is None or not _shares_stage(pair) or cam.cam_option(method).smooth == "aug":
        # no check (refuse it), a check on another stage than the framing probes' (weights fitted before), or a
        # map averaged over augmented passes: the check runs on its own pass first
        return diagnose_apart(pair, data, name, method)
    t0 = time.perf_counter()
    square, xray = pair.prepare(data, name)  # the model's pixels: the same path as training and `kd predict`
    decoding = time.perf_counter() - t0
    teacher = pair.models["teacher"]

    checked: dict = {}

    def check(maps: torch.Tensor) -> None:  # the teacher's layer3 output, inside its heat map's forward pass
        t = time.perf_counter()
        maps = maps.detach().float()
        with torch.inference_mode():
            [why] = pair.ood.reasons(teacher.model, square[None], maps, turns=False)
            if why is not None:
                raise _Refused(maps)
            checked["warnings"] = pair.framing.warnings(teacher.model, square[None], maps)[0] if pair.framing else ()
        checked["seconds"] = time.perf_counter() - t

    x = preprocess.to_tensor(square)
    t1 = time.perf_counter()
    try:
        p, teacher_map = cam.explain(teacher, x, method, stage_hook=(FRAMING_STAGE, check))
    except _Refused as refused:  # the sentence, with the hint to turn a radiograph upright, outside the pass
        [why], _ = screen_squares(pair, square[None], refused.maps)
        raise NotChestXray(why) from None
    if "seconds" not in checked:  # never a probability without the check
        raise RuntimeError(f"the refusal check did not see the teacher's {FRAMING_STAGE} in its heat map's pass")
    teacher_seconds = time.perf_counter() - t1 - checked["seconds"]
    if checked["warnings"]:
        xray = dataclasses.replace(xray, warnings=tuple(xray.warnings) + checked["warnings"])
    t2 = time.perf_counter()
    picture = display_picture(display_pixels(pair, data, name, xray), pair.input_size)
    seconds = {"decoding": decoding + time.perf_counter() - t2, "refusal check": checked["seconds"]}
    first = {"teacher": (p, teacher_map, teacher_seconds)}
    return _diagnosis(pair, Screened(square, xray, picture, seconds), method, first)


def diagnose_apart(pair: ModelPair, data: bytes, name: str = "upload", method: str = cam.DEFAULT_CAM) -> Diagnosis:
    """`diagnose` with the refusal check on a teacher pass of its own first (screen), then the heat-map passes:
    where the check cannot ride on the map's pass, and the baseline bench/diagnose.py times `diagnose` against."""
    t0 = time.perf_counter()
    square, xray = pair.prepare(data, name)
    t1 = time.perf_counter()
    xray = screen(pair, square, xray)
    seconds = {"decoding": t1 - t0, "refusal check": time.perf_counter() - t1}
    t2 = time.perf_counter()
    picture = display_picture(display_pixels(pair, data, name, xray), pair.input_size)
    seconds["decoding"] += time.perf_counter() - t2
    return diagnose_screened(pair, Screened(square, xray, picture, seconds), method)


def diagnose_screened(pair: ModelPair, screened: Screened, method: str = cam.DEFAULT_CAM) -> Diagnosis:
    """Both predictions and both heat maps of a screened upload (one forward and backward pass per model): what a
    change of heat-map method costs."""
    return _diagnosis(pair, screened, method, {})


def _diagnosis(pair: ModelPair, screened: Screened, method: str, done: dict) -> Diagnosis:
    x = preprocess.to_tensor(screened.square)
    views, spent = {}, dict(screened.seconds)
    lungs = screened.lungs
    for role, loaded in pair.models.items():
        if role in done:
            p, heat, spent[role] = done[role]
        else:
            t0 = time.perf_counter()
            p, heat = cam.explain(loaded, x, method)
            spent[role] = time.perf_counter() - t0
        views[role] = ModelView(p, decide(p, loaded.threshold), loaded.threshold, heat, spent[role],
                                in_lung_share(heat, lungs))
    return Diagnosis(screened.square, screened.xray, views, cam.agreement(views["teacher"].cam, views["student"].cam),
                     screened.picture, spent, lungs)


def time_note(seconds: dict[str, float]) -> str:
    """Where a diagnosis's time went, in the order it was spent."""
    return "Time on this machine: " + " · ".join(f"{what} {s:.2f} s" for what, s in seconds.items())
