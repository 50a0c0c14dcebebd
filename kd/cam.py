"""Heat maps of teacher and student, how far they agree, and how faithful they are.

The maps are for the PNEUMONIA logit of both models, so the two maps answer the same question: which regions
raise the pneumonia score. Where they come from is a choice (CAM_OPTIONS): a Grad-CAM-family method of
pytorch_grad_cam on one or several ResNet stages, whose native grid is the input size / 4 (layer1), / 8 (layer2),
/ 16 (layer3) or / 32 (layer4): at 160 px 40x40, 20x20, 10x10, 5x5; or a map on the pixels themselves, of the
score's gradient with respect to them or of what removing a patch of them does to the score (InputMap: SmoothGrad,
integrated gradients, occlusion), at the input's resolution. DEFAULT_CAM was chosen by bench/cam_grid.py (ROAD
faithfulness and the map's mass inside the lung fields, on validation); the plain names "GradCAM" and "GradCAM++"
still mean that method on layer4. The map's first forward pass also gives the probability (and the refusal check
its features, kd.serving), so diagnosing costs that pass and the method's further passes per model. Overlays are
drawn on the X-ray at DISPLAY_SIZE (at least), not at the model's input size, so the picture a clinician reads
stays sharp when the models run at 128 px.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import gaussian_blur
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

from kd import preprocess
from kd.data import PNEUMONIA
from kd.metrics import softmax_pneumonia

if TYPE_CHECKING:  # kd.serving draws its diagnoses with this module: the names only, not an import cycle
    from kd.serving import LoadedModel, ModelPair

class InputMap:
    """A map on the input pixels, at the input's resolution (not of a stage's activations): from the score's
    gradient with respect to them, or from occluding them; shaped like pytorch_grad_cam's classes (a context
    manager called with the input and targets, `outputs` the clean pass's logits) so that explain() draws it as
    them. Each method is `image_map`: one image [1, C, H, W] and its target -> the map [H, W] (>= 0, any scale)."""

    def __init__(self, model: torch.nn.Module, target_layers=None):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def image_map(self, image: torch.Tensor, target) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, input_tensor: torch.Tensor, targets, eigen_smooth: bool = False,
                 aug_smooth: bool = False) -> np.ndarray:
        with torch.no_grad():  # the clean pass first: the probability, and a stage hook sees this image
            self.outputs = self.model(input_tensor)
        maps = []
        for image, target in zip(input_tensor, targets):
            m = self.image_map(image[None], target).detach()
            maps.append((m / m.max().clamp_min(1e-12)).numpy())
        return np.stack(maps)


class SmoothGrad(InputMap):
    """Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise": the mean absolute gradient of the
    target's score with respect to the input pixels over noisy copies of the input: where the score is sensitive
    (what kd.losses.lung_gradient constrains in training), not which way."""

    samples = 16
    noise = 0.15  # std of the added noise as a share of the input's range (the paper's 10-20 %)

    def image_map(self, image: torch.Tensor, target) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)  # the same noise every time: the same map for the same image
        sigma = self.noise * float(image.max() - image.min())
        noisy = image + sigma * torch.randn((self.samples, *image.shape[1:]), generator=generator)
        noisy.requires_grad_(True)
        (grad,) = torch.autograd.grad(target(self.model(noisy)).sum(), noisy)  # the target's logit of every copy
        return grad.abs().mean(0).sum(0)


class IntegratedGradients(InputMap):
    """Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks", from a blurred copy of the image
    (Xu et al. 2020, "Attribution in Scale and Space"): each pixel's share of the score's rise from the blurred
    image to the image itself, (x - blurred) times the mean gradient along the straight path between them; the
    shares add up to that rise (completeness). A blurred baseline is what ROAD removes a pixel towards (its
    neighbours' values), so where this map is high, removing the pixels lowers the score. The signed shares are
    pooled over a neighbourhood (the same blur) so that the map shows regions, not single pixels, and the positive
    part is drawn: the evidence for PNEUMONIA."""

    steps = 4  # midpoints of the path (exact for a score quadratic in the pixels): 4 keeps Diagnose within 1 s
    blur_fraction = 1 / 32  # the blur's sigma as a share of the image side (4 px at 128, 5 px at 160)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        sigma = max(0.5, self.blur_fraction * x.shape[-1])
        kernel = 2 * math.ceil(2 * sigma) + 1
        return gaussian_blur(x, [kernel, kernel], [sigma, sigma])

    def attributions(self, x: torch.Tensor, target) -> torch.Tensor:
        """Per-pixel shares [H, W] (summed over channels) of target(model(x)) - target(model(blur(x))) for one
        image [1, C, H, W]: the path's points go through the model as one batch."""
        baseline = self.blur(x)
        delta = x - baseline
        alphas = (torch.arange(self.steps, dtype=x.dtype) + 0.5) / self.steps
        points = (baseline + alphas[:, None, None, None] * delta).contiguous(memory_format=torch.channels_last)
        points.requires_grad_(True)
        (grad,) = torch.autograd.grad(target(self.model(points)).sum(), points)
        return (delta[0] * grad.mean(0)).sum(0)

    def image_map(self, image: torch.Tensor, target) -> torch.Tensor:
        return self.blur(self.attributions(image, target)[None, None])[0, 0].clamp_min(0)


class Occlusion(InputMap):
    """Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks": the score's drop when a square
    patch is replaced by the same region of a heavily blurred copy (the picture without the patch's structure), for
    patches half a patch apart; each pixel gets the mean drop (its positive part) of the patches over it. Not a
    gradient: what removing a region does to the score, what ROAD measures, at one forward pass per patch (225 at
    160 px), so seconds per map on a CPU."""

    patch_fraction = 1 / 8  # the patch's side as a share of the image side (20 px at 160); the fill's blur sigma
    batch = 32

    def patches(self, side: int) -> tuple[int, list[tuple[int, int]]]:
        """The patch side and the top-left corners of the patches: half a patch apart, the last one at the edge."""
        patch = self.patch_side(side, self.patch_fraction)
        starts = list(range(0, side - patch + 1, max(1, patch // 2)))
        starts += [side - patch] if starts[-1] != side - patch else []
        return patch, [(r, c) for r in starts for c in starts]

    @staticmethod
    def patch_side(side: int, fraction: float) -> int:
        """The patch's side in pixels for an image `side` pixels wide and a patch `fraction` of it."""
        return max(2, round(fraction * side))

    @staticmethod
    def fill(image: torch.Tensor, patch: int) -> torch.Tensor:
        """What an occluded patch shows: the image blurred with a sigma of one patch side."""
        sigma = float(patch)
        kernel = min(2 * math.ceil(2 * sigma) + 1, 2 * ((image.shape[-1] - 1) // 2) + 1)  # reflect padding < side
        return gaussian_blur(image, [kernel, kernel], [sigma, sigma])

    @torch.no_grad()
    def image_map(self, image: torch.Tensor, target) -> torch.Tensor:
        patch, corners = self.patches(image.shape[-1])
        filled = self.fill(image, patch)
        clean = target(self.model(image.contiguous(memory_format=torch.channels_last))).reshape(-1)[0]
        total, count = torch.zeros(image.shape[-2:]), torch.zeros(image.shape[-2:])
        for start in range(0, len(corners), self.batch):
            chunk = corners[start:start + self.batch]
            where = torch.zeros(len(chunk), 1, *image.shape[-2:], dtype=torch.bool)
            for i, (r, c) in enumerate(chunk):
                where[i, :, r:r + patch, c:c + patch] = True
            views = torch.where(where, filled, image).contiguous(memory_format=torch.channels_last)
            drops = (clean - target(self.model(views))).clamp_min(0)
            total += (drops[:, None, None] * where[:, 0]).sum(0)
            count += where[:, 0].sum(0)
        return total / count


METHODS = {"GradCAM": GradCAM, "GradCAM++": GradCAMPlusPlus}  # on layer4, the names the app has always passed
_CAM_CLASSES = {**METHODS, "LayerCAM": LayerCAM, "HiResCAM": HiResCAM, "SmoothGrad": SmoothGrad,
                "IntegratedGradients": IntegratedGradients, "Occlusion": Occlusion}
# stride-2 steps before each ResNet stage's output ("input": the pixels themselves, for InputMap methods)
STAGE_HALVINGS = {"input": 0, "layer1": 2, "layer2": 3, "layer3": 4, "layer4": 5}


@dataclass(frozen=True)
class CamOption:
    """A CAM method on the last block of one or several ResNet stages (several: their maps, each scaled
    to [0, 1], are averaged at the input size), or a gradient method on the input pixels ("input")."""

    method: str  # GradCAM, GradCAM++, LayerCAM (Jiang et al. 2021: meant for shallower stages) or HiResCAM
    layers: tuple[str, ...]
    smooth: str = ""  # "eigen": first principal component of the weighted activations; "aug": mean over 6 test-
    # time augmentations (flips, brightness; 6x the time); pytorch_grad_cam's eigen_smooth / aug_smooth
    # scale by the map's 99th percentile instead of its maximum (values above it count as the most): for maps made
    # of a few sharp peaks (HiResCAM on an early stage), where scaling by the one highest peak leaves the rest
    # invisible on the overlay. Monotone, so the map's ranking (what ROAD reads) keeps its order
    robust_scale: bool = False

    def grid(self, input_size: int) -> int:
        """Side of the finest native grid among its stages (each stride-2 step rounds up)."""
        return max(_halve(input_size, STAGE_HALVINGS[layer]) for layer in self.layers)

    def source(self, input_size: int) -> str:
        g = self.grid(input_size)
        smoothed = {"eigen": ", eigen-smoothed", "aug": ", averaged over 6 augmentations"}.get(self.smooth, "")
        scaled = ", scaled to its 99th percentile" if self.robust_scale else ""
        return f"{self.method} on {'+'.join(self.layers)}{smoothed}{scaled}, native grid {g}x{g} at {input_size} px"


def _halve(n: int, times: int) -> int:
    for _ in range(times):
        n = math.ceil(n / 2)
    return n


CAM_OPTIONS = {  # measured by bench/cam_grid.py
    "layer4 GradCAM": CamOption("GradCAM", ("layer4",)),
    "layer3 GradCAM": CamOption("GradCAM", ("layer3",)),
    "layer3 LayerCAM": CamOption("LayerCAM", ("layer3",)),
    "layer2 GradCAM": CamOption("GradCAM", ("layer2",)),
    "layer2 LayerCAM": CamOption("LayerCAM", ("layer2",)),
    "layer2+3+4 LayerCAM": CamOption("LayerCAM", ("layer2", "layer3", "layer4")),
    "layer3 GradCAM eigen": CamOption("GradCAM", ("layer3",), "eigen"),
    "layer2 GradCAM eigen": CamOption("GradCAM", ("layer2",), "eigen"),
    "layer3 GradCAM aug": CamOption("GradCAM", ("layer3",), "aug"),
    "layer2 GradCAM aug": CamOption("GradCAM", ("layer2",), "aug"),
    "layer2 GradCAM++": CamOption("GradCAM++", ("layer2",)),
    "layer3 GradCAM++": CamOption("GradCAM++", ("layer3",)),
    # HiResCAM (Draelos & Carin 2020): the gradient times the activation element by element, not a channel's mean
    # gradient times its map, so the map keeps where within the grid the score is sensitive
    "layer2 HiResCAM": CamOption("HiResCAM", ("layer2",), robust_scale=True),
    "layer1 HiResCAM": CamOption("HiResCAM", ("layer1",), robust_scale=True),
    "input SmoothGrad": CamOption("SmoothGrad", ("input",)),
    "input IntegratedGradients": CamOption("IntegratedGradients", ("input",), robust_scale=True),
    "input Occlusion": CamOption("Occlusion", ("input",)),
}
# chosen by bench/cam_grid.py's rule on validation (the GPU weights shipped until 2026-12-05, 160 px): among options
# with a native grid of at least 14x14 and ROAD above zero for both models, the highest in-lung share (kd.lungs).
# Integrated gradients also has the highest ROAD of any option for the teacher and the closest teacher-student
# agreement (README "Which heat map"); the figures live in bench/cam_grid_shipped.json, not here
DEFAULT_CAM = "input IntegratedGradients"


def cam_option(method: str) -> CamOption:
    """A CAM_OPTIONS name, or a plain METHODS name (that method on layer4)."""
    if method in CAM_OPTIONS:
        return CAM_OPTIONS[method]
    if method in METHODS:
        return CamOption(method, ("layer4",))
    raise ValueError(f"Unknown CAM method {method!r}; choose {', '.join([*CAM_OPTIONS, *METHODS])}")


def border_share(cam: np.ndarray, fraction: float = 0.1) -> float | None:
    """Share of the map's mass on the outer `fraction` of the image on every side (a uniform map:
    1 - (1 - 2 * fraction)^2, 0.36 at 10 %); None for an empty map. Maps that light the border or the
    background outside the chest are suspect."""
    cam = np.asarray(cam, dtype=np.float64)
    total = cam.sum()
    if total <= 0:
        return None
    h, w = cam.shape
    bh, bw = max(1, round(fraction * h)), max(1, round(fraction * w))
    inner = cam[bh:h - bh, bw:w - bw].sum()
    return float((total - inner) / total)


DISPLAY_SIZE = 448  # px of the picture the heat maps are drawn on
TOP_FRACTION = 0.2  # the "hot" region compared by the agreement score
AGREEMENT_HELP = ("CAM agreement: Pearson correlation of the two heat maps (1 = same regions, 0 = unrelated) and "
                  "overlap (IoU) of their hottest 20% of pixels.")
ROAD_HELP = ("Faithfulness (ROAD, Rong et al. 2022): how much the pneumonia score drops when the pixels the map calls "
             "important are removed, minus the drop when unimportant ones are; higher = the map explains the model.")


def explain(loaded: LoadedModel, x: torch.Tensor, method: str = DEFAULT_CAM,
            stage_hook: tuple[str, Callable[[torch.Tensor], None]] | None = None) -> tuple[float, np.ndarray]:
    """Calibrated probability of pneumonia and the CAM [H, W] in [0, 1] for one normalised input [1, 1, H, W].

    `method`: a CAM_OPTIONS name or a plain METHODS name (cam_option; its .source(size) says which
    stages and native grid the map comes from). `stage_hook` (stage, fn): fn gets that ResNet stage's output
    from the CAM's own forward pass, once, before the backward; an exception it raises stops the pass and comes
    out of here (kd.serving refuses a picture there, from the features the map is then drawn with). The model's
    lock makes this safe when several app sessions diagnose at once; the context managers release the hooks even
    on error."""
    option = cam_option(method)
    model = loaded.model
    layers = [getattr(model, name)[-1] for name in option.layers if name != "input"]
    with loaded.lock, torch.enable_grad(), _stage_hook(model, stage_hook), \
            _CAM_CLASSES[option.method](model=model, target_layers=layers) as cam:
        x = x.contiguous(memory_format=torch.channels_last)
        targets = [ClassifierOutputTarget(PNEUMONIA)] * x.shape[0]
        maps = cam(input_tensor=x, targets=targets, eigen_smooth=option.smooth == "eigen",
                   aug_smooth=option.smooth == "aug")
        if option.smooth == "aug":  # cam.outputs holds the last augmented view's: the probability is the plain one's
            with torch.no_grad():
                logits = model(x).detach().float().cpu().numpy()
        else:
            logits = cam.outputs.detach().float().cpu().numpy()
    m = maps[0]
    if option.robust_scale:
        m = np.clip(m / max(float(np.percentile(m, 99)), 1e-12), 0.0, 1.0).astype(m.dtype)
    return float(softmax_pneumonia(logits, loaded.calibration_temperature)[0]), m


@contextmanager
def _stage_hook(model: torch.nn.Module, hook: tuple[str, Callable[[torch.Tensor], None]] | None):
    """explain's stage_hook as a forward hook on the stage, called on the first pass only, removed on exit."""
    if hook is None:
        yield
        return
    stage, fn = hook
    called = []

    def forward_hook(module, inputs, output):
        if not called:
            called.append(True)
            fn(output)

    handle = getattr(model, stage).register_forward_hook(forward_hook)
    try:
        yield
    finally:
        handle.remove()


def overlay(picture: np.ndarray, cam: np.ndarray, opacity: float = 0.4, strength: float = 1.0) -> np.ndarray:
    """RGB uint8 picture of the X-ray with the heat map (jet) blended per pixel at `opacity` x `strength` x the
    map's value: where the map is 0 the plain X-ray shows, where it is 1 the colour at `opacity` x `strength`.
    `strength` fades a whole map (fade_strength: by the model's probability). A map of another size than the
    picture is resized to it (bilinear)."""
    if cam.shape != picture.shape:
        cam = np.asarray(Image.fromarray(cam.astype(np.float32)).resize(
            picture.shape[::-1], Image.Resampling.BILINEAR))
    cam = np.nan_to_num(cam.astype(np.float32)).clip(0, 1)
    rgb = np.repeat((picture.astype(np.float32) / 255)[..., None], 3, axis=2)
    import cv2

    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    alpha = float(opacity) * float(np.clip(strength, 0.0, 1.0)) * cam[..., None]
    return np.uint8(np.round(255 * ((1 - alpha) * rgb + alpha * heat.astype(np.float32) / 255)))


# jet, the overlay's colour map, as a CSS gradient for the scale drawn beside the maps (matplotlib's jet stops)
JET_STOPS = ("#00007f", "#0000ff", "#007fff", "#00ffff", "#7fff7f", "#ffff00", "#ff7f00", "#ff0000", "#7f0000")
MAP_MEANING = ("Colour: where the model's evidence for PNEUMONIA lies in this image, relative to its own strongest "
               "evidence (blue: little, red: the most). It is not a probability and not an outline of a lesion; each "
               "map is scaled on its own image, so two maps' reds are not comparable.")
FADE_MEANING = (" Faded by the model's probability: the map of a case at 0 % is drawn faint (15 % strength), one "
                "at 100 % at full strength.")
FADE_FLOOR = 0.15  # a faded map keeps this much of its strength, so the evidence behind a NORMAL stays findable


def fade_strength(probability: float) -> float:
    """How strongly a map is drawn when faded by its model's probability of pneumonia."""
    return FADE_FLOOR + (1 - FADE_FLOOR) * float(np.clip(probability, 0.0, 1.0))


EMPTY_MAP_NOTE = ("Empty heat map: no region raises this model's pneumonia score; the agreement figures then say "
                  "nothing.")


def empty_map_note(probability: float, decision: str, threshold: float) -> str:
    """EMPTY_MAP_NOTE with what an empty map means for this decision and probability."""
    if decision == "PNEUMONIA":
        return (EMPTY_MAP_NOTE + f" Unexpected with a PNEUMONIA decision ({probability:.0%}): the score comes "
                "from no one region, so read the decision with care.")
    if probability < threshold / 2:
        return EMPTY_MAP_NOTE + " Usual for a confident NORMAL."
    return EMPTY_MAP_NOTE + f" The decision is NORMAL, but at {probability:.0%} not a confident one."


def decision_rule(threshold: float) -> str:
    """The rule a model's decision follows, said next to its probability."""
    return f"PNEUMONIA if the calibrated probability is ≥ {threshold:.1%}, else NORMAL"


def is_empty(cam: np.ndarray) -> bool:
    """Grad-CAM keeps only positive evidence (ReLU): with none for PNEUMONIA the map is all zero."""
    return float(np.max(cam)) <= 1e-6


def agreement(cam_a: np.ndarray, cam_b: np.ndarray) -> dict[str, float | None]:
    """Correlation of two maps and IoU of their top-20% regions (see AGREEMENT_HELP); both None when
    either map is empty (is_empty): there is then nothing to compare, not an agreement of 0."""
    if is_empty(cam_a) or is_empty(cam_b):
        return {"correlation": None, "top20_iou": None}
    a, b = cam_a.ravel().astype(np.float64), cam_b.ravel().astype(np.float64)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    k = max(1, int(TOP_FRACTION * a.size))
    top_a, top_b = np.zeros(a.size, bool), np.zeros(b.size, bool)
    top_a[np.argsort(a)[-k:]] = True
    top_b[np.argsort(b)[-k:]] = True
    iou = float((top_a & top_b).sum() / (top_a | top_b).sum())
    return {"correlation": corr, "top20_iou": iou}


def road_scores(loaded: LoadedModel, squares: np.ndarray, method: str = "GradCAM",
                percentiles=(20, 40, 60, 80), progress=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """ROAD combined faithfulness score of each image's CAM for the pneumonia class, and the CAMs."""
    scores, maps = [], []
    metric = ROADCombined(percentiles=list(percentiles))
    for i, square in enumerate(squares):
        x = preprocess.to_tensor(square)
        _, cam = explain(loaded, x, method)
        with loaded.lock, torch.no_grad():
            score = metric(x, cam[None], [ClassifierOutputSoftmaxTarget(PNEUMONIA)], loaded.model)
        scores.append(float(np.asarray(score).ravel()[0]))
        maps.append(cam)
        if progress:
            progress(i + 1, len(squares))
    return np.asarray(scores), maps


def faithfulness(pair: ModelPair, samples, method: str = "GradCAM", progress=None,
                 percentiles: tuple[int, ...] = (20, 40, 60, 80)) -> dict:
    """ROAD faithfulness of each model's maps and the mean teacher/student CAM agreement on a sample of
    dataset images (kd.data.Sample, or anything with a `.path`); unreadable images are left out.

    `progress(fraction, text)` is called as the work goes (one ROAD pass per model); the agreement
    reuses the maps ROAD computed, averaged over the images where neither map is empty."""
    from pathlib import Path

    squares, names = [], []
    for s in samples:
        try:
            square, _ = pair.prepare(Path(s.path).read_bytes(), Path(s.path).name)
        except (preprocess.ImageError, OSError):
            continue
        squares.append(square)
        names.append(Path(s.path).name)
    n = len(squares)
    out = {"n": n, "method": method, "files": names, "road": {}, "agreement": {}}
    if not n:
        return out
    roles = tuple(pair.models)
    total, maps = len(roles) * n, {}
    for k, role in enumerate(roles):
        cb = (lambda i, m, k=k, role=role: progress((k * n + i) / total, f"ROAD, {role}: {i}/{m}")) \
            if progress else None
        scores, maps[role] = road_scores(pair.models[role], np.stack(squares), method, percentiles, progress=cb)
        out["road"][role] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "scores": scores.tolist()}
    pairs = [agreement(t, s) for t, s in zip(maps["teacher"], maps["student"])]
    defined = [a for a in pairs if a["correlation"] is not None]
    out["agreement"] = {key: float(np.mean([a[key] for a in defined])) if defined else None
                        for key in ("correlation", "top20_iou")}
    out["agreement"]["empty_maps"] = n - len(defined)
    return out
