"""The Diagnose page's logic: one image through both models, remembered in the session, drawn as a case.

Uploaded files are handled as bytes in memory only: nothing here writes them to disk or logs them.
Their results are kept in the user's own session state (never in a cache shared between sessions),
bounded to the last `MEMO_SIZE` images.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import streamlit as st

from kd import cam, lungs, preprocess, serving
from kd import data as kdata
from kd.serving import ModelPair, NotChestXray
from kd.ood import REASON_END
from kd.ui.served import ROLE_LABEL, ROLES, architecture

# the heat maps on offer, the measured default first (kd.cam.DEFAULT_CAM, chosen by bench/cam_grid.py)
CAM_METHODS = (cam.DEFAULT_CAM, *(name for name in cam.CAM_OPTIONS if name != cam.DEFAULT_CAM))
CAM_HELP = ("Where the heat map comes from, for the PNEUMONIA output of each model: integrated gradients (each "
            "pixel's share of the score's rise from a blurred copy of the X-ray to the X-ray itself), SmoothGrad, "
            "occlusion (the score's drop when each patch is blurred away: the most literal, about 10 s a teacher "
            "map on a 2-core CPU), or a Grad-CAM-family method on one or several ResNet stages (layer1: a grid of "
            "the input / 4, layer2: / 8, layer3: / 16, layer4: / 32). The default was chosen on validation X-rays by "
            "how faithfully it explains the score (ROAD) and how much of it lies on the lungs (bench/cam_grid.py; "
            "README, \"Which heat map\").")
MEMO_KEY = "_kd_diagnoses"
MEMO_SIZE = 48  # decoded uploads and diagnoses remembered per session (by bytes digest; memory only)
UPLOAD_LABEL = f"Chest X-rays ({preprocess.FORMAT_NAMES}); several at once are fine"
UPLOAD_HELP = (f"{preprocess.FORMAT_NAMES} ({', '.join(preprocess.FILE_SUFFIXES)}). Files are processed in memory only: never written to disk, never "
               "logged, forgotten when the session ends.")


REFUSAL_NOTE = ("Before any probability, each picture is checked against the X-rays the models learnt from "
                "(grey-level statistics and the teacher's features; kd/ood.py, threshold in the model card). Other "
                "pictures get confident but meaningless numbers, so none is shown.")


@dataclass
class CaseResult:
    """One image's outcome: a diagnosis, or the human message of why it was refused."""

    name: str
    method: str
    diagnosis: serving.Diagnosis | None = None
    error: str | None = None
    truth: str | None = None
    refused: bool = False  # readable, but not a chest radiograph like the training ones (kd.ood): no probability
    picture: np.ndarray | None = None  # what was refused, shown small so the reader sees what was uploaded

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.diagnosis.xray.warnings) if self.diagnosis and self.diagnosis.xray else ()


def session_memo() -> dict:
    return st.session_state.setdefault(MEMO_KEY, {})


def _recall(memo: dict | None, key):
    if memo is None or key not in memo:
        return None
    value = memo.pop(key)
    memo[key] = value  # most recently used last
    return value


def _remember(memo: dict | None, key, value) -> None:
    if memo is not None:
        memo[key] = value
        while len(memo) > MEMO_SIZE:
            memo.pop(next(iter(memo)))


def diagnose_bytes(pair: ModelPair, data: bytes, name: str, method: str = cam.DEFAULT_CAM, memo: dict | None = None,
                   truth: str | None = None) -> CaseResult:
    """Both predictions and heat maps of one file, or its refusal; never raises for a bad image.

    `memo` (the session's dict) remembers, by content digest, each upload's decoding and refusal check and, per
    heat-map method, its maps: a slider move costs nothing, a change of method only the two maps."""
    upload = (hashlib.sha256(data).hexdigest(), name, str(pair.weights_dir))
    result = _recall(memo, (*upload, method))
    if result is not None:
        return replace(result, truth=truth)
    screened = _recall(memo, (*upload, "screened"))
    try:
        if screened is None:  # first sight: decoded once, checked inside the teacher's own pass (kd.serving)
            result = CaseResult(name, method, diagnosis=serving.diagnose(pair, data, name, method))
            _remember(memo, (*upload, "screened"), result.diagnosis.screened)
        else:  # another heat-map method: only the two maps
            result = CaseResult(name, method, diagnosis=serving.diagnose_screened(pair, screened, method))
    except NotChestXray as e:
        result = CaseResult(name, method, error=str(e), refused=True, picture=_thumbnail(data, name))
    except preprocess.ImageError as e:
        result = CaseResult(name, method, error=str(e))
    _remember(memo, (*upload, method), result)
    return replace(result, truth=truth)


def _thumbnail(data: bytes, name: str, size: int = 256) -> np.ndarray | None:
    """What was refused, small and in its own colours (a colour photograph is shown in colour, not as the grey
    square the models saw); DICOM and anything Pillow cannot draw go through the models' decoder in grey. Only
    pictures that decoder already read within its size limits get here."""
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode reduced
            shown = ImageOps.exif_transpose(img).convert("RGB")
            shown.thumbnail((size, size))
            return np.asarray(shown)
    except Exception:  # noqa: BLE001 - DICOM, or a format Pillow draws differently: the grey fallback below
        pass
    try:
        return preprocess.load_xray(data, name=name, target_size=size).pixels
    except preprocess.ImageError:
        return None


def diagnose_file(pair: ModelPair, path: str, method: str = cam.DEFAULT_CAM, memo: dict | None = None,
                  truth: str | None = None) -> CaseResult:
    """A dataset image (path on disk) through exactly the upload path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return CaseResult(Path(path).name, method, error=f"Could not read {Path(path).name}: {e.strerror or e}.",
                          truth=truth)
    return diagnose_bytes(pair, data, Path(path).name, method, memo, truth)


def diagnose_sample(pair: ModelPair, sample: kdata.Sample, method: str = cam.DEFAULT_CAM,
                    memo: dict | None = None) -> CaseResult:
    """A dataset case, with its ground truth shown next to the predictions."""
    return diagnose_file(pair, sample.path, method, memo, truth=kdata.CLASSES[sample.label])


def overlay_image(result: CaseResult, role: str, opacity: float, fade: bool = True,
                  outline_lungs: bool = True) -> np.ndarray:
    """The X-ray with `role`'s map; `fade`: drawn at kd.cam.fade_strength of its probability; `outline_lungs`: the
    estimated lung fields (Diagnosis.lungs) outlined in white."""
    d = result.diagnosis
    view = d.views[role]
    rgb = cam.overlay(d.picture, view.cam, opacity, cam.fade_strength(view.probability) if fade else 1.0)
    if outline_lungs and d.lungs is not None and d.lungs.any():
        rgb = rgb.copy()
        rgb[lungs.outline(d.lungs, rgb.shape[:2])] = 255
    return rgb


LUNGS_HELP = ("Lung fields: estimated from the X-ray's own brightness profiles and grey levels (kd/lungs.py), with "
              "no model and no radiologist's outline: the lateral edges and bases are followed as far as they stay "
              "lung-dark, the hila and the lung behind the heart and the diaphragm's dome fall outside it, and on a "
              "hazy or unusual film the outline can be a rough box. A map spread evenly over the picture would put "
              "the outline's share of the area on it.")


def lung_share_text(view: serving.ModelView, mask: np.ndarray | None) -> str | None:
    """How much of a map lies on the estimated lung fields, against an even spread; a caution when less does than
    an even spread would put there (the evidence then lies mostly on the shoulders, the diaphragm, the spine or the
    film's markers, a sign of a shortcut, not of the lungs' findings). None when there is no map or no outline."""
    if view.in_lungs is None or mask is None or not mask.any():
        return None
    even = float(mask.mean())
    text = f"{view.in_lungs:.0%} of this map lies on the outlined lung fields (an even spread: {even:.0%})."
    if view.in_lungs < even:
        text += (" :orange[Less than an even spread: most of this model's evidence here lies outside the lungs "
                 "(shoulders, diaphragm, spine, markers); read the map with caution.]")
    return text


def render_colour_scale(fade: bool) -> None:
    """The heat maps' colour scale (jet, as drawn) and what the colour means, once above the cases."""
    stops = ", ".join(cam.JET_STOPS)
    st.markdown(f'<div style="display:flex;align-items:center;gap:0.5em;font-size:0.85em">'
                f'<span>little evidence</span><div style="flex:0 0 260px;height:12px;border-radius:3px;'
                f'background:linear-gradient(to right, {stops})"></div><span>the most, in this image</span></div>',
                unsafe_allow_html=True)
    st.caption(cam.MAP_MEANING + (cam.FADE_MEANING if fade else ""))


def agreement_text(value: float | None) -> str:
    """An agreement figure, or n/a when a heat map was empty (cam.agreement)."""
    return "n/a" if value is None else f"{value:.2f}"


def decision_badge(decision: str) -> str:
    return f":red-badge[{decision}]" if decision == "PNEUMONIA" else f":green-badge[{decision}]"


def render_uploads(pair: ModelPair, files, method: str, opacity: float, fade: bool = True,
                   outline_lungs: bool = True) -> None:
    """Each uploaded file diagnosed and drawn in turn, under a progress bar that names the file at work."""
    if not files:
        return
    n = len(files)
    bar = st.progress(0.0)
    results = []
    for i, upload in enumerate(files):
        bar.progress(i / n, text=f"Diagnosing {upload.name} ({i + 1} of {n})...")
        results.append(diagnose_bytes(pair, upload.getvalue(), upload.name, method, memo=session_memo()))
        render_case(results[-1], pair, opacity, fade, outline_lungs)
    bar.progress(1.0, text=outcome_summary(results))


def outcome_summary(results: list[CaseResult]) -> str:
    """What became of the files: "3 files: 1 diagnosed, 1 refused (not a chest X-ray like the training ones),
    1 unreadable"; never "diagnosed" for a file that got no probability."""
    n = len(results)
    counts = {"diagnosed": sum(r.diagnosis is not None for r in results),
              "refused (no probability: see each)": sum(r.refused for r in results),
              "unreadable": sum(r.error is not None and not r.refused for r in results)}
    parts = [f"{k} {what}" for what, k in counts.items() if k]
    return f"{n} file{'s' if n != 1 else ''}: " + ", ".join(parts) + "."


def render_case(result: CaseResult, pair: ModelPair, opacity: float = 0.4, fade: bool = True,
                outline_lungs: bool = True) -> None:
    """One image: teacher and student side by side, then how far they agree. Errors stay in this box."""
    with st.container(border=True):
        title = f"**{result.name}**"
        if result.truth:
            title += f" &nbsp; ground truth: {decision_badge(result.truth)}"
        st.markdown(title)
        if result.refused:
            left, right = st.columns([1, 3])
            if result.picture is not None:
                left.image(result.picture, width=160, caption="the uploaded picture")
            reason = result.error.replace(REASON_END, ".")  # the heading already says no probability
            reason += "" if reason.endswith(".") else "."
            right.warning(f"**Refused: no probability is shown.** {reason}", icon=":material/block:")
            right.caption(REFUSAL_NOTE)
            return
        if result.error:
            st.error(result.error)
            return
        for warning in result.warnings:
            st.warning(warning)
        d = result.diagnosis
        columns = st.columns(2, gap="medium")
        for column, role in zip(columns, ROLES):
            view = d.views[role]
            with column:
                st.markdown(f"##### {ROLE_LABEL[role]} ({architecture(pair, role)})")
                left, right = st.columns(2)
                left.metric("Probability of pneumonia", f"{view.probability:.1%}")
                right.metric("Time", f"{view.seconds:.2f} s", help="prediction and heat map on this machine")
                st.markdown(f"Decision: {decision_badge(view.decision)} &nbsp; rule: "
                            f"{cam.decision_rule(view.threshold)} (the model card's threshold)")
                st.image(overlay_image(result, role, opacity, fade, outline_lungs), width=380,
                         caption=f"{ROLE_LABEL[role]} · heat map for PNEUMONIA: "
                                 f"{cam.cam_option(result.method).source(pair.input_size)}"
                                 + (f" · drawn at {cam.fade_strength(view.probability):.0%} strength" if fade else ""))
                if cam.is_empty(view.cam):
                    st.caption(cam.empty_map_note(view.probability, view.decision, view.threshold))
                elif share := lung_share_text(view, d.lungs):
                    st.caption(share, help=LUNGS_HELP)
        a, b, c = st.columns(3)
        a.metric("Decisions", "same" if d.same_decision else "different")
        b.metric("CAM correlation", agreement_text(d.agreement["correlation"]), help=cam.AGREEMENT_HELP)
        c.metric("Top-20% overlap (IoU)", agreement_text(d.agreement["top20_iou"]), help=cam.AGREEMENT_HELP)
        st.caption(cam.AGREEMENT_HELP)
        st.caption(serving.time_note(d.seconds) + " (the refusal check reads the teacher's layer3 from the teacher's "
                   "own pass, so it adds only its arithmetic; a change of heat-map method recomputes only the two "
                   "maps).")
