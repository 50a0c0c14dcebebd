"""Loading a weights folder and predicting on uploads: one file or many (what `kd predict` and the app share),
each checked by the refusal check first. Whole image sets are scored by kd.scoring."""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd import preprocess
from kd.checkpoint import CheckpointError, file_in_folder, load_weights
from kd.metrics import is_pneumonia, softmax_pneumonia
from kd.model_card import CARD_FILE, read_card
from kd.models import build
from kd.framing import FramingCheck
from kd.framing import load as load_framing
from kd.ood import OODCheck, file_sha256
from kd.ood import load as load_ood
from kd.paths import default_weights

ROLES = ("teacher", "student")


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

    card: dict
    models: dict[str, LoadedModel]
    weights_dir: Path
    ood: "OODCheck | None" = None  # kd.ood: refuses what is not a chest radiograph; None when not fitted
    framing: "FramingCheck | None" = None  # kd.framing: warns of crops, zooms and mirror images; None when not fitted

    @property
    def input_size(self) -> int:
        return int(self.card["input"]["size"])

    @property
    def contrast(self) -> str:
        """Contrast normalisation the models were trained with (kd.preprocess.apply_contrast)."""
        return str(self.card["input"].get("contrast", "none"))

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
        info = card["models"][role]
        model = load_weights(build(info["architecture"]), file_in_folder(weights_dir, info["file"])).eval()
        model = model.to(memory_format=torch.channels_last)
        threshold = float(info.get("threshold", 0.5))
        models[role] = LoadedModel(role, model, threshold, float(info.get("calibration_temperature", 1.0)))
    teacher_file = file_in_folder(weights_dir, card["models"]["teacher"]["file"])
    check = load_ood(weights_dir, teacher_file) if ood else None
    framing = load_framing(weights_dir, file_sha256(teacher_file)) if ood else None
    return ModelPair(card, models, weights_dir, check, framing)


def no_check_reason(weights_dir: str | Path) -> str:
    """Why nothing is predicted with weights that have no fitted out-of-distribution check (kd.ood)."""
    from kd.ood import REASON_END

    return (f"The weights in {weights_dir} have no fitted out-of-distribution check, so nothing tells a chest X-ray "
            f"from any other picture (a photograph gets a confident probability too){REASON_END[:-1]} until it is "
            f"fitted: `python -m kd fit-ood --weights {weights_dir} --data DATA` (every run exported by this "
            "version fits it itself).")


def check_in_distribution(pair: ModelPair, square: np.ndarray) -> str | None:
    """Why this prepared square is not a chest radiograph like the training ones (a sentence for a person),
    or None when it is (kd.ood); weights without a fitted check refuse everything (no_check_reason). Call it
    before showing a probability."""
    if pair.ood is None:
        return no_check_reason(pair.weights_dir)
    teacher = pair.models["teacher"]
    with teacher.lock:
        return pair.ood.reason(teacher.model, square)


class NotChestXray(preprocess.ImageError):
    """A readable picture refused by the out-of-distribution check (kd.ood): no probability is given."""


@torch.inference_mode()
def screen_squares(pair: ModelPair, squares: np.ndarray) -> tuple[list[str | None], list[tuple[str, ...]]]:
    """Before any probability, for each square of [N, S, S]: why it is refused (kd.ood; None when it is not) and
    the framing warnings of those not refused (kd.framing). Both checks read the teacher's layer3 map: it is
    computed once for the two."""
    from kd.framing import STAGE
    from kd.ood import stage_maps

    refusals, warnings = [None] * len(squares), [()] * len(squares)
    if pair.ood is None:  # without the check no picture is known to be an X-ray: no bare probability
        return [no_check_reason(pair.weights_dir)] * len(squares), warnings
    if not len(squares):
        return refusals, warnings
    teacher = pair.models["teacher"]
    with teacher.lock:
        shared = pair.framing is not None and pair.ood.stage == STAGE
        maps = torch.cat(list(stage_maps(teacher.model, squares, STAGE))) if shared else None
        refusals = pair.ood.reasons(teacher.model, squares, maps)
        kept = [i for i, why in enumerate(refusals) if why is None]
        if pair.framing is not None and kept:
            found = pair.framing.warnings(teacher.model, squares[kept], maps[kept] if maps is not None else None)
            for i, w in zip(kept, found):
                warnings[i] = w
    return refusals, warnings


def screen(pair: ModelPair, square: np.ndarray, xray: preprocess.XRay) -> preprocess.XRay:
    """screen_squares for one square: NotChestXray when it is refused, else the X-ray with the framing warnings
    added to its own (the decoder's notes)."""
    [refusal], [extra] = screen_squares(pair, square[None])
    if refusal:
        raise NotChestXray(refusal)
    return dataclasses.replace(xray, warnings=tuple(xray.warnings) + extra) if extra else xray


def decide(probability: float, threshold: float) -> str:
    """The decision rule, on the calibrated probability of pneumonia."""
    return "PNEUMONIA" if is_pneumonia(probability, threshold) else "NORMAL"


@torch.inference_mode()
def predict_squares(pair: ModelPair, squares: np.ndarray) -> list[dict[str, dict]]:
    """Probability of pneumonia and decision of each model for each preprocessed square of [N, S, S], in one
    batched forward pass per model (`seconds`: the pass's time shared out per image)."""
    x = preprocess.normalize(torch.from_numpy(np.array(squares)))[:, None]  # a copy: squares may be read-only
    x = x.contiguous(memory_format=torch.channels_last)
    out: list[dict[str, dict]] = [{} for _ in range(len(squares))]
    for role, m in pair.models.items():
        t0 = time.perf_counter()
        with m.lock:
            logits = m.model(x).float().numpy()
        p = softmax_pneumonia(logits, m.calibration_temperature)
        each = (time.perf_counter() - t0) / max(1, len(squares))
        for i, value in enumerate(p.tolist()):
            out[i][role] = {"probability": value, "decision": decide(value, m.threshold), "threshold": m.threshold,
                            "seconds": each}
    return out


def predict_square(pair: ModelPair, square: np.ndarray) -> dict[str, dict]:
    """Probability of pneumonia and decision of each model for one preprocessed square image."""
    return predict_squares(pair, square[None])[0]


def predict_bytes(pair: ModelPair, data: bytes, name: str = "upload") -> dict:
    """Decode, preprocess, check it is a chest radiograph (check_in_distribution) and predict; raises
    preprocess.ImageError with a human message."""
    square, xray = pair.prepare(data, name)
    xray = screen(pair, square, xray)
    return {"file": name, **predict_square(pair, square), "warnings": list(xray.warnings)}


def predict_files(pair: ModelPair, paths: list[str], batch_size: int = 16, workers: int = 2):
    """`predict_bytes` for many files, in their order: (path, result or None, error message or None) each.

    Decoding runs in `workers` threads (Pillow releases the GIL) one batch ahead of the models, and each batch goes
    through the refusal check and both models in one forward pass each, instead of one file at a time."""
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
            squares = np.stack([d[1] for d in readable]) if readable else None
            refusals, framing = screen_squares(pair, squares) if readable else ([], [])
            kept = [i for i, why in enumerate(refusals) if why is None]
            results = dict(zip(kept, predict_squares(pair, squares[kept]))) if kept else {}
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
