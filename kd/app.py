"""Everything the Streamlit pages need beyond laying out widgets.

The pages in `pages/` only place widgets and call into this module: cached model and dataset
loaders, the session's memory of diagnoses, building a `Config` from the training form, turning
progress events into pandas frames and plotly figures, evaluation summaries, and the few render
helpers shared by two pages (`render_case`, `show_error`, `render_dataset_help`).

Uploaded files are handled as bytes in memory only: nothing here writes them to disk or logs
them. Their results are kept in the user's own session state (never in a cache shared between
sessions), bounded to the last `MEMO_SIZE` images.

Paths are read from the environment on every call (`KD_WEIGHTS`, `KD_RUNS_DIR`, `KD_DATA`), so a
test or a launcher can point the app elsewhere without re-importing `kd`.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from kd import cam, jobs, metrics, preprocess
from kd import runs as kruns
from kd import data as kdata
from kd import progress as kprogress
from kd.checkpoint import CheckpointError
from kd.config import PRESETS, Config, preset
from kd.inference import ModelPair, load_pair
from kd.paths import REPO, default_runs_root, default_weights
from kd.model_card import CARD_FILE, DISCLAIMER, read_card  # noqa: F401  (DISCLAIMER: shown by the entry script)
from kd.statefile import UnreadableState

ROLES = ("teacher", "student")
ROLE_LABEL = {"teacher": "Teacher", "student": "Student"}
CAM_METHODS = tuple(cam.METHODS)
AGREEMENT_HELP = cam.AGREEMENT_HELP
ROAD_HELP = cam.ROAD_HELP
ENTRY_SCRIPT = REPO / "streamlit_app.py"
DATA_KEY = "kd_data_root"  # the dataset folder, shared by every page (sidebar text input)
MEMO_KEY = "_kd_diagnoses"
EVAL_KEY = "_kd_evaluations"
FAITH_KEY = "_kd_faithfulness"
WATCH_KEY = "kd_watch_run"
MEMO_SIZE = 32  # diagnoses remembered per session (bytes digests -> results, memory only)
UPLOAD_HELP = ("JPEG, PNG or DICOM (.dcm). Files are processed in memory only: never written to disk, never "
               "logged, forgotten when the session ends.")
DATASET_HELP = (
    "This page needs the labelled dataset: *Chest X-Ray Images (Pneumonia)*, Kermany et al. 2018 "
    "(Cell 172:1122), from Mendeley Data, doi:[10.17632/rscbjbr9sj.2](https://doi.org/10.17632/rscbjbr9sj.2) "
    "(licence CC BY 4.0), or the same images on Kaggle as "
    "[chest-xray-pneumonia](https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia). "
    "Unpack it and type the folder that holds `train/` (and optionally `val/`, `test/`) into **Dataset folder** "
    "in the sidebar (or start the app with `KD_DATA=/path/to/chest_xray`)."
)


# ----------------------------------------------------------------------------- paths and session


def runs_root() -> Path:
    """Where the Train page writes runs (env KD_RUNS_DIR, else <repo>/runs)."""
    return default_runs_root()


def shipped_weights() -> Path:
    """The weights folder shipped with the app (env KD_WEIGHTS, else <repo>/weights)."""
    return default_weights()


def active_weights() -> Path:
    """The activated run's weights, else the shipped ones (also when active.json cannot be used:
    `state_problems` says why, and the pages show it)."""
    try:
        return kruns.active_weights(runs_root())
    except UnreadableState:
        return shipped_weights()


def running_job() -> dict | None:
    """The running job's lock record, or None (also when the lock cannot be used: see `state_problems`)."""
    try:
        return jobs.current_job(runs_root())
    except UnreadableState:
        return None


def state_problems() -> list[str]:
    """Why shared state files the app relies on (which weights are in use, the running job) could not be
    used, each as "unreadable: <file>, <why>" plus what the app does instead."""
    problems = []
    for read, fallback in ((lambda: kruns.active_weights(runs_root()), "the shipped weights are used instead"),
                           (lambda: jobs.current_job(runs_root()), "no running job can be shown or stopped")):
        try:
            read()
        except UnreadableState as e:
            problems.append(f"{e}; {fallback}.")
    return problems


def show_state_problems() -> None:
    """Called by every page under its title: state files that could not be used, said once, the page goes on."""
    for message in state_problems():
        st.warning(message, icon=":material/warning:")


def using_shipped_weights() -> bool:
    return active_weights() == shipped_weights()


def default_data_root() -> str:
    return os.environ.get("KD_DATA", "")


def init_session() -> None:
    """Defaults of the state shared across pages (called by the entry script before the pages run)."""
    st.session_state.setdefault(DATA_KEY, default_data_root())


def ensure_navigation() -> None:
    """Called first by every page: make sure it runs inside the entry script's navigation.

    Streamlit treats an app with a `pages/` folder as a legacy multipage app until the entry script has
    called `st.navigation` once in the process (and `AppTest` resets that on every run), so a page opened
    by URL in that state would run alone, without the disclaimer and the sidebar. Then the entry script
    is run here instead (it draws the page through `st.navigation`) and this outer run stops."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - a Streamlit without that internal
        return
    if not getattr(PagesManager, "uses_pages_directory", False):
        return
    PagesManager.uses_pages_directory = False
    import runpy

    runpy.run_path(str(ENTRY_SCRIPT), run_name="__main__")
    st.stop()


def data_root_value() -> str:
    return str(st.session_state.get(DATA_KEY) or "").strip()


# ----------------------------------------------------------------------------- models


def no_weights_message(weights_dir: Path) -> str:
    repo = REPO
    return (
        f"No model weights found in `{weights_dir}` (it has no `{CARD_FILE}`).\n\n"
        "To get weights, train them once on the Kermany dataset:\n\n"
        f"```\ncd {repo}\npython -m kd pipeline --data /path/to/chest_xray --out {weights_dir} --preset cpu\n```\n\n"
        "(`--preset cpu` takes about 45-75 minutes on 2 CPU cores, `--preset gpu` about 10 minutes on one GPU), "
        "or start a run on the **Train** page and click **Use these weights** when it has finished. "
        "Set the environment variable `KD_WEIGHTS` to use a weights folder elsewhere."
    )


@st.cache_resource(show_spinner="Loading teacher and student...", max_entries=2)
def _load_pair_cached(weights_dir: str, card_stamp: float) -> ModelPair:
    return load_pair(weights_dir)


def load_models(weights_dir: str | Path | None = None) -> tuple[ModelPair | None, str | None]:
    """(models, None) or (None, a message for the page): loaded once per weights folder (and card version)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else active_weights()
    card = weights_dir / CARD_FILE
    if not card.is_file():
        return None, no_weights_message(weights_dir)
    try:
        return _load_pair_cached(str(weights_dir.resolve()), card.stat().st_mtime), None
    except (CheckpointError, OSError, KeyError, ValueError, RuntimeError) as e:
        return None, (f"The weights in `{weights_dir}` could not be loaded: {e}\n\n"
                      "Train new ones (`python -m kd pipeline ...` or the Train page) or switch back to the shipped "
                      "weights on the Train page.")


def require_models() -> ModelPair:
    """The models for a page, or the page shows why there are none and stops there."""
    pair, problem = load_models()
    if problem:
        st.error(problem)
        st.stop()
    return pair


def clear_model_cache() -> None:
    _load_pair_cached.clear()


def weights_caption(pair: ModelPair) -> str:
    card = pair.card
    where = "shipped weights" if Path(pair.weights_dir).resolve() == shipped_weights().resolve() else \
        f"run **{Path(pair.weights_dir).name}**"
    arch = " / ".join(card["models"][r]["architecture"] for r in ROLES)
    return (f"Models: {where} ({arch}, input {pair.input_size} px, trained {str(card.get('date', '?'))[:10]}). "
            f"Decisions use each model's threshold from the model card.")


def architecture(pair: ModelPair, role: str) -> str:
    return str(pair.card["models"][role].get("architecture", role))


# ----------------------------------------------------------------------------- diagnose


@dataclass
class CaseResult:
    """One image's outcome: a diagnosis, or the human message of why it was refused."""

    name: str
    method: str
    diagnosis: cam.Diagnosis | None = None
    error: str | None = None
    truth: str | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.diagnosis.xray.warnings) if self.diagnosis and self.diagnosis.xray else ()


def session_memo() -> dict:
    return st.session_state.setdefault(MEMO_KEY, {})


def diagnose_bytes(pair: ModelPair, data: bytes, name: str, method: str = "GradCAM", memo: dict | None = None,
                   truth: str | None = None) -> CaseResult:
    """Both predictions and heat maps of one file, or its refusal; never raises for a bad image.

    `memo` (the session's dict) remembers results by content digest, so reruns (slider moves) are free."""
    key = (hashlib.sha256(data).hexdigest(), name, str(pair.weights_dir), method)
    if memo is not None and key in memo:
        result = memo.pop(key)
        memo[key] = result  # most recently used last
        return replace(result, truth=truth)
    try:
        result = CaseResult(name, method, diagnosis=cam.diagnose(pair, data, name, method))
    except preprocess.ImageError as e:
        result = CaseResult(name, method, error=str(e))
    if memo is not None:
        memo[key] = result
        while len(memo) > MEMO_SIZE:
            memo.pop(next(iter(memo)))
    return replace(result, truth=truth)


def diagnose_file(pair: ModelPair, path: str, method: str = "GradCAM", memo: dict | None = None,
                  truth: str | None = None) -> CaseResult:
    """A dataset image (path on disk) through exactly the upload path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return CaseResult(Path(path).name, method, error=f"Could not read {Path(path).name}: {e.strerror or e}.",
                          truth=truth)
    return diagnose_bytes(pair, data, Path(path).name, method, memo, truth)


def diagnose_sample(pair: ModelPair, sample: kdata.Sample, method: str = "GradCAM",
                    memo: dict | None = None) -> CaseResult:
    """A dataset case, with its ground truth shown next to the predictions."""
    return diagnose_file(pair, sample.path, method, memo, truth=kdata.CLASSES[sample.label])


def overlay_image(result: CaseResult, role: str, opacity: float) -> np.ndarray:
    d = result.diagnosis
    return cam.overlay(d.picture, d.views[role].cam, opacity)


def agreement_text(value: float | None) -> str:
    """An agreement figure, or n/a when a heat map was empty (cam.agreement)."""
    return "n/a" if value is None else f"{value:.2f}"


def decision_badge(decision: str) -> str:
    return f":red-badge[{decision}]" if decision == "PNEUMONIA" else f":green-badge[{decision}]"


def render_case(result: CaseResult, pair: ModelPair, opacity: float = 0.4) -> None:
    """One image: teacher and student side by side, then how far they agree. Errors stay in this box."""
    with st.container(border=True):
        title = f"**{result.name}**"
        if result.truth:
            title += f" &nbsp; ground truth: {decision_badge(result.truth)}"
        st.markdown(title)
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
                st.markdown(f"Decision: {decision_badge(view.decision)} at threshold {view.threshold:.3f}")
                st.image(overlay_image(result, role, opacity), width=380,
                         caption=f"{ROLE_LABEL[role]} · {result.method} heat map for PNEUMONIA")
                if cam.is_empty(view.cam):
                    st.caption(cam.EMPTY_MAP_NOTE)
        a, b, c = st.columns(3)
        a.metric("Decisions", "same" if d.same_decision else "different")
        b.metric("CAM correlation", agreement_text(d.agreement["correlation"]), help=AGREEMENT_HELP)
        c.metric("Top-20% overlap (IoU)", agreement_text(d.agreement["top20_iou"]), help=AGREEMENT_HELP)
        st.caption(AGREEMENT_HELP)


# ----------------------------------------------------------------------------- dataset


def dataset_state(path: str | None = None) -> tuple[Path | None, str | None]:
    """(root, None) for a usable dataset; (None, None) when no path is set; (None, message) when it is wrong."""
    path = data_root_value() if path is None else str(path).strip()
    if not path:
        return None, None
    try:
        return kdata.check_root(path), None
    except kdata.DatasetError as e:
        return None, str(e)


def show_error(message: str) -> None:
    """An error whose message may end with the dataset layout: the layout goes in a code block."""
    head, sep, tail = message.partition("\n\n")
    st.error(head)
    if sep and tail.strip():
        st.code(tail, language=None)


def render_dataset_help(error: str | None = None) -> None:
    """How to get the dataset, the expected layout, and what is wrong with the path typed."""
    if error:
        show_error(error.split("\n\nExpected layout")[0])
    st.info(DATASET_HELP)
    st.code(kdata.LAYOUT_HELP, language=None)


def split_params() -> tuple[float, int]:
    """val_fraction and seed of the patient-level split: the active weights' config, else the defaults."""
    cfg = Config()
    try:
        saved = read_card(active_weights()).get("config", {})
        return float(saved.get("val_fraction", cfg.val_fraction)), int(saved.get("seed", cfg.seed))
    except (OSError, ValueError):
        return cfg.val_fraction, cfg.seed


@st.cache_data(show_spinner="Reading the dataset (patients, duplicates)...", ttl=3600, max_entries=4)
def dataset_splits(root: str, val_fraction: float = 0.15, seed: int = 0) -> dict[str, list[kdata.Sample]]:
    """train / val (patient-level, carved from train/) / official-val / test."""
    return kdata.load_splits(root, val_fraction, seed)


def available_splits(root: str | Path) -> list[str]:
    """Splits that can be evaluated, the most useful first."""
    out = []
    if kdata.find_split(root, "test") is not None:
        out.append("test")
    out.append("val")
    if kdata.find_split(root, "val") is not None:
        out.append("official-val")
    out.append("train")
    return out


SPLIT_HELP = {
    "val": "patient-level validation split carved from train/ (thresholds were chosen on it)",
    "official-val": "the official val/ folder (16 images in Kermany: too small to judge by)",
    "test": "the official test/ folder",
    "train": "train/ minus the validation patients (what the models learned from)",
}


def split_samples(root: str | Path, split: str) -> list[kdata.Sample]:
    return dataset_splits(str(root), *split_params())[split]


def case_label(sample: kdata.Sample) -> str:
    return f"{Path(sample.path).name} ({kdata.CLASSES[sample.label]})"


def split_counts(splits: dict[str, list[kdata.Sample]]) -> pd.DataFrame:
    """Images and patients per class and split (with `describe`), plus totals."""
    rows = []
    for name, samples in splits.items():
        info = kdata.describe(samples)
        row = {"split": name}
        for cls in kdata.CLASSES:
            row[f"{cls} images"] = info[cls]["images"]
            row[f"{cls} patients"] = info[cls]["patients"]
        row["total images"] = len(samples)
        row["total patients"] = len({s.patient for s in samples})
        row["% pneumonia"] = round(100 * info["PNEUMONIA"]["images"] / max(1, len(samples)), 1)
        row["what it is"] = SPLIT_HELP.get(name, "")
        rows.append(row)
    return pd.DataFrame(rows)


def stratified_sample(samples: list[kdata.Sample], n: int, seed: int = 0) -> list[kdata.Sample]:
    """Up to n samples, about half of each class, deterministic for a seed."""
    rng = random.Random(seed)
    by_class = [[s for s in samples if s.label == c] for c in range(len(kdata.CLASSES))]
    for group in by_class:
        rng.shuffle(group)
    out, i = [], 0
    while len(out) < n and any(i < len(g) for g in by_class):
        for g in by_class:
            if i < len(g) and len(out) < n:
                out.append(g[i])
        i += 1
    return out


@st.cache_data(show_spinner="Reading image sizes...", ttl=600, max_entries=4)
def image_sizes(root: str, n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Width and height (from the file header, no decoding) of a sample of every split."""
    from PIL import Image

    splits = dataset_splits(root, *split_params())
    rows = []
    for split, samples in splits.items():
        for s in stratified_sample(samples, n, seed):
            try:
                with Image.open(s.path) as im:
                    w, h = im.size
            except OSError:
                continue
            rows.append({"split": split, "class": kdata.CLASSES[s.label], "width": w, "height": h,
                         "file": Path(s.path).name})
    return pd.DataFrame(rows, columns=["split", "class", "width", "height", "file"])


def size_histogram(sizes: pd.DataFrame) -> go.Figure:
    long = sizes.melt(id_vars=["class"], value_vars=["width", "height"], var_name="side", value_name="pixels")
    fig = px.histogram(long, x="pixels", color="class", facet_col="side", barmode="overlay", nbins=40, opacity=0.7,
                       color_discrete_map={"NORMAL": "#4c9f70", "PNEUMONIA": "#c8553d"})
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    return fig


@st.cache_data(show_spinner="Loading sample images...", ttl=600, max_entries=8)
def sample_thumbnails(root: str, split: str = "train", per_class: int = 4, size: int = 256,
                      seed: int = 0) -> dict[str, list[tuple[np.ndarray, str]]]:
    """Per class, a few (thumbnail, caption) pairs decoded with the app's own preprocessing."""
    from PIL import Image

    samples = dataset_splits(root, *split_params())[split]
    out: dict[str, list[tuple[np.ndarray, str]]] = {}
    for label, cls in enumerate(kdata.CLASSES):
        group = [s for s in samples if s.label == label]
        random.Random(f"{seed}-{cls}").shuffle(group)
        thumbs = []
        for s in group[:per_class]:
            try:
                pixels = preprocess.load_xray_file(s.path, target_size=size).pixels
            except preprocess.ImageError:
                continue
            image = Image.fromarray(pixels)
            image.thumbnail((size, size))
            thumbs.append((np.asarray(image), f"{Path(s.path).name} · patient {s.patient}"))
        out[cls] = thumbs
    return out


# ----------------------------------------------------------------------------- train: form -> job

COMMANDS = {
    "Full pipeline (SSL-pretrain, fine-tune, distil)": "pipeline",
    "SSL-pretrain the teacher": "pretrain",
    "Fine-tune the teacher": "finetune",
    "Distil the student": "distill",
}
DEVICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
TEACHER_TARGET_LABELS = {None: "The preset's choice (cpu: cached, gpu: online)",
                         "online": "Online (teacher on every augmented view)", "cached": "Cached (computed once, faster)"}
RUN_NAME_KEY = "kd_run_name"
_NEXT_RUN_NAME = "_kd_next_run_name"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_run_name() -> str:
    return "run-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_train_form() -> None:
    """Before the form is drawn: a fresh default run name (after a start, a new one)."""
    if st.session_state.pop(_NEXT_RUN_NAME, False) or RUN_NAME_KEY not in st.session_state:
        st.session_state[RUN_NAME_KEY] = default_run_name()


def preset_summary(name: str) -> str:
    cfg = PRESETS[name]()
    parts = [f"{ph} {cfg.phase(ph).epochs} ep @ {cfg.phase(ph).image_size} px, batch {cfg.phase(ph).batch_size}"
             for ph in ("pretrain", "finetune", "distill")]
    return f"**{name}**: " + "; ".join(parts) + f"; evaluated at {cfg.eval_image_size} px. {PRESETS[name].__doc__}"


def preset_defaults(name: str) -> dict:
    cfg = PRESETS[name]()
    return {"temperature": cfg.temperature, "alpha": cfg.alpha, "ssl_method": cfg.ssl_method}


def build_config(data_root: str, run_name: str, preset_name: str = "cpu", epochs: int | None = None,
                 image_size: int | None = None, batch_size: int | None = None, temperature: float | None = None,
                 alpha: float | None = None, ssl_method: str | None = None, device: str = "auto",
                 baseline: bool = True, teacher_targets: str | None = None) -> Config:
    """The one Config the CLI would build from the same choices; raises DatasetError / JobError / ValueError.

    None keeps the preset's value (epochs, image size and batch size then differ per phase)."""
    root = kdata.check_root(data_root)
    run_dir = kruns.run_dir_for(run_name, runs_root())
    if device not in DEVICES.values():
        raise ValueError(f"Unknown device {device!r}")
    if device == "cuda" and gpu_count() == 0:
        raise ValueError("GPU was chosen but no GPU is visible to this machine; choose Auto or CPU.")
    cfg = preset(preset_name, image_size=image_size or None, epochs=epochs, batch_size=batch_size or None,
                 temperature=temperature, alpha=alpha, ssl_method=ssl_method, teacher_targets=teacher_targets)
    cfg.data, cfg.out, cfg.device, cfg.baseline = str(root.resolve()), str(run_dir), device, bool(baseline)
    cfg.validate()
    return cfg


def start_training(form: dict, command: str, gpus: int = 1) -> tuple[dict | None, str | None]:
    """Start a job from the form's values: (job record, None) or (None, the message to show)."""
    try:
        cfg = build_config(**form)
        run_dir = Path(cfg.out)
        if running_job() is None and run_dir.exists() and any(run_dir.iterdir()):
            raise jobs.JobError(f"A run named {run_dir.name} already exists: choose another run name, or select it "
                                "below and Resume it if it was stopped.")
        record = jobs.start_job(cfg, command, gpus=max(1, int(gpus)), runs_root=runs_root())
    except (kdata.DatasetError, kruns.RunError, ValueError, OSError) as e:
        return None, str(e)
    st.session_state[WATCH_KEY] = Path(record["run_dir"]).name
    st.session_state[_NEXT_RUN_NAME] = True
    return record, None


def stop_training() -> str:
    return "Stopped; the last finished epoch is kept (Resume continues from it)." if jobs.stop_job(runs_root()) \
        else "No job was running."


def resume_training(run_name: str) -> tuple[dict | None, str | None]:
    try:
        record = jobs.resume_job(kruns.run_dir_for(run_name, runs_root()), runs_root())
    except (kruns.RunError, ValueError, OSError) as e:
        return None, str(e)
    st.session_state[WATCH_KEY] = run_name
    return record, None


def watched_run() -> Path | None:
    """The run the live view follows: the running job, else the one chosen, else the newest."""
    root = runs_root()
    job = running_job()
    if job:
        return Path(job["run_dir"])
    name = st.session_state.get(WATCH_KEY)
    if name and (root / name).is_dir():
        return root / name
    runs = kruns.list_runs(root)
    return Path(runs[0]["path"]) if runs else None


def run_names() -> list[str]:
    return [r["name"] for r in kruns.list_runs(runs_root())]


# ----------------------------------------------------------------------------- train: progress


def step_frame(events: list[dict]) -> pd.DataFrame:
    """Logged steps in run order: `x` counts steps over all phases (a resumed epoch's repeats replaced)."""
    cols = ["x", "phase", "epoch", "step", "global_step", "total_steps", "loss", "lr", "images_per_s", "eta_s",
            "time"]
    steps = [e for e in events if e.get("kind") == "step"]
    if not steps:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(steps)
    for c in cols[1:]:
        if c not in df:
            df[c] = np.nan
    order = list(dict.fromkeys(df["phase"]))
    df = df.drop_duplicates(["phase", "global_step"], keep="last")
    df["phase"] = pd.Categorical(df["phase"], categories=order, ordered=True)
    df = df.sort_values(["phase", "global_step"])
    offsets, total = {}, 0
    for ph in order:
        offsets[ph] = total
        rows = df["phase"] == ph
        planned = df.loc[rows, "total_steps"].max()  # NaN when no step of the phase said
        total += int(planned if pd.notna(planned) and planned > 0 else df.loc[rows, "global_step"].max())
    df["x"] = df["global_step"] + df["phase"].astype(str).map(offsets)
    df["phase"] = df["phase"].astype(str)
    return df[cols].reset_index(drop=True)


def epoch_frame(events: list[dict]) -> pd.DataFrame:
    """Validation metrics per phase and epoch (AUC, accuracy... or the SSL kNN probe)."""
    rows = {}
    for e in events:
        if e.get("kind") == "epoch":
            rows[(e.get("phase"), e.get("epoch"))] = {"phase": e.get("phase"), "epoch": e.get("epoch"),
                                                      **(e.get("metrics") or {}), "seconds": e.get("seconds")}
    return pd.DataFrame(list(rows.values()))


def _line(df: pd.DataFrame, y: str, title: str, log: bool = False) -> go.Figure:
    fig = px.line(df, x="x", y=y, color="phase", markers=True, log_y=log,
                  labels={"x": "step (all phases)", y: y.replace("_", " ")})
    fig.update_layout(title=title, height=300, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    return fig


def loss_figure(steps: pd.DataFrame) -> go.Figure:
    return _line(steps, "loss", "Training loss")


def lr_figure(steps: pd.DataFrame) -> go.Figure:
    return _line(steps, "lr", "Learning rate")


def metrics_figure(epochs: pd.DataFrame) -> go.Figure | None:
    cols = [c for c in ("auc", "accuracy", "knn_accuracy", "knn_balanced_accuracy") if c in epochs]
    if epochs.empty or not cols:
        return None
    df = epochs.assign(label=epochs["phase"].astype(str) + " " + epochs["epoch"].astype(str))
    long = df.melt(id_vars=["phase", "epoch", "label"], value_vars=cols, var_name="metric").dropna(subset=["value"])
    fig = px.line(long, x="label", y="value", color="metric", markers=True, range_y=[0, 1.02],
                  category_orders={"label": list(dict.fromkeys(df["label"]))},
                  labels={"label": "phase and epoch", "value": ""})
    fig.update_layout(title="Validation per epoch", height=300, margin=dict(l=10, r=10, t=40, b=10),
                      legend_title_text="")
    return fig


def _duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class RunView:
    name: str
    path: Path
    state: str  # running | finished | failed | stopped | starting
    status: dict
    steps: pd.DataFrame
    epochs: pd.DataFrame
    fraction: float
    progress_text: str
    images_per_s: float | None
    elapsed: str
    error: str | None
    running: bool
    problems: list[str]  # "unreadable: <file>, <why>" for status.json / progress.jsonl: shown, the rest goes on

    @property
    def can_resume(self) -> bool:
        return not self.running and self.state in ("stopped", "failed") and (self.path / "config.json").exists()


def run_view(run_dir: str | Path) -> RunView:
    """Everything the live panel shows about one run, from its status and progress files only."""
    run_dir = Path(run_dir)
    job = running_job()
    running = bool(job and Path(job["run_dir"]).resolve() == run_dir.resolve())
    problems = []
    try:
        status = kruns.run_status(run_dir, kprogress.load_status(run_dir) or {})
    except UnreadableState as e:
        status = {}
        problems.append(str(e))
    events, bad_lines = kprogress.load_progress(run_dir)
    if bad_lines:
        problems.append(str(bad_lines))
    state = status.get("state") or "unknown"
    fresh = (status.get("started") or 0) >= (job or {}).get("started", 0)
    if running and (state not in ("running", "finished") or not fresh):
        state = "starting"  # launched or resumed, and the old status not rewritten yet
    phases = list(status.get("phases") or [])
    phase = status.get("phase")
    steps = step_frame(events)
    if state == "finished":
        fraction, text = 1.0, "finished"
    elif phase in phases:
        i = phases.index(phase)
        within = (status.get("global_step") or 0) / max(1, status.get("total_steps") or 1)
        if status.get("last_event") == "phase_start":
            within = 0.0
        fraction = min(1.0, (i + within) / max(1, len(phases)))
        text = (f"{phase} ({i + 1}/{len(phases)}) · epoch {status.get('epoch', '?')}/{status.get('epochs', '?')} · "
                f"step {status.get('step', '?')}/{status.get('steps', '?')}")
        if status.get("eta_s") is not None and status.get("last_event") == "step":
            text += f" · ETA for this phase {_duration(status.get('eta_s'))}"
    elif phase == "export":
        fraction, text = 0.99, f"exporting weights and model card ({status.get('model', '')})"
    else:
        fraction, text = 0.0, "preparing data (decoding images into the cache)" if running else state
    started = status.get("started")
    end = status.get("finished") or status.get("stopped") or (time.time() if running else status.get("updated"))
    elapsed = _duration(end - started) if started and end else "?"
    return RunView(run_dir.name, run_dir, state, status, steps, epoch_frame(events), float(fraction), text,
                   status.get("images_per_s"), elapsed, None if running else status.get("error"), running, problems)


def log_tail(run_dir: str | Path, lines: int = 25, max_bytes: int = 64_000) -> str:
    """The last lines of train.log (progress-bar carriage returns folded)."""
    path = Path(run_dir) / "train.log"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    out = [line.split("\r")[-1] for line in text.split("\n")]
    return "\n".join([line for line in out if line.strip()][-lines:])


def _card_number(card: dict | None, role: str, key: str) -> float | None:
    try:
        v = card["models"][role]["validation"][key]
        return None if v is None else round(float(v), 3)
    except (KeyError, TypeError, ValueError):
        return None


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per run with its state and key numbers from its model card (validation split)."""
    rows = []
    for r in runs:
        st_, card = r["status"], r["card"]
        cfg = (card or {}).get("config", {})
        rows.append({
            "run": r["name"], "state": st_.get("state", "?"), "phases": ", ".join(st_.get("phases") or []),
            "preset": cfg.get("preset", ""),
            "teacher AUC": _card_number(card, "teacher", "auc"), "student AUC": _card_number(card, "student", "auc"),
            "teacher acc": _card_number(card, "teacher", "accuracy"),
            "student acc": _card_number(card, "student", "accuracy"),
            "wall time": _duration((card or {}).get("wall_time_s", {}).get("total")) if card else "",
            "modified": datetime.datetime.fromtimestamp(r["modified"]).strftime("%Y-%m-%d %H:%M"),
            "note": r.get("problem") or "",  # e.g. "unreadable: <run>/model_card.json, <why>"
        })
    frame = pd.DataFrame(rows)
    return frame if frame.empty or frame["note"].any() else frame.drop(columns="note")


def has_both_models(run: dict) -> bool:
    """A finished run whose card has an exported teacher and student (a single phase may export only one)."""
    models = (run.get("card") or {}).get("models", {})
    return all("threshold" in models.get(role, {}) and (Path(run["path"]) / models[role].get("file", "")).is_file()
               for role in ROLES)


def usable_runs(runs: list[dict]) -> list[str]:
    """Runs whose weights Diagnose and Evaluate can use."""
    return [r["name"] for r in runs if has_both_models(r)]


def list_runs() -> list[dict]:
    return kruns.list_runs(runs_root())


def use_run(name: str) -> str | None:
    """Activate a finished run's weights for Diagnose and Evaluate; returns an error message or None."""
    try:
        kruns.activate(kruns.run_dir_for(name, runs_root()), runs_root())
    except (kruns.RunError, OSError) as e:
        return str(e)
    clear_model_cache()
    return None


def use_shipped() -> None:
    kruns.reset_active(runs_root())
    clear_model_cache()


def active_label() -> str:
    return "shipped weights" if using_shipped_weights() else f"run {active_weights().name}"


# ----------------------------------------------------------------------------- evaluate

TABLE_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")
METRIC_NAMES = {"auc": "AUC", "accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity",
                "f1": "F1", "precision": "Precision"}


def _fmt_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    lo, hi = (ci or [None, None])[:2]
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else f"{value:.3f}"


def reports_from_card(card: dict) -> dict[str, dict]:
    return {role: card["models"][role].get("validation") or {} for role in ROLES}


def metrics_table(reports: dict[str, dict], card: dict) -> pd.DataFrame:
    """Rows: metrics with 95% CIs, threshold, parameters, CPU ms/image; columns: teacher, student."""
    rows = {METRIC_NAMES[m] + " (95% CI)": {ROLE_LABEL[r]: _fmt_ci(reports[r].get(m), reports[r].get("ci", {}).get(m))
                                           for r in ROLES} for m in TABLE_METRICS}
    rows["Threshold"] = {ROLE_LABEL[r]: f"{reports[r].get('threshold', card['models'][r].get('threshold', 0.5)):.3f}"
                         for r in ROLES}
    rows["Cases (pneumonia / normal)"] = {ROLE_LABEL[r]: f"{reports[r].get('n_positive', '?')} / "
                                          f"{reports[r].get('n_negative', '?')}" for r in ROLES}
    rows["Parameters"] = {ROLE_LABEL[r]: f"{card['models'][r].get('parameters', 0) / 1e6:.1f} M" for r in ROLES}
    rows["CPU ms / image"] = {ROLE_LABEL[r]: f"{card['models'][r].get('cpu_ms_per_image', float('nan')):.1f}"
                              for r in ROLES}
    rows["Architecture"] = {ROLE_LABEL[r]: str(card["models"][r].get("architecture", "")) for r in ROLES}
    return pd.DataFrame(rows).T


def ci_note(reports: dict[str, dict]) -> str:
    """What the 95% CIs resampled (patients or images) and whether the threshold was held fixed in them."""
    report = reports.get("teacher") or {}
    if not report.get("resampled"):
        return "95% bootstrap CIs."
    fixed = report.get("threshold_in_bootstrap", "fixed") == "fixed"
    return (f"95% bootstrap CIs ({report.get('n_boot', '?')} resamples of {report['resampled']}; threshold "
            f"{'held fixed' if fixed else 're-chosen in each resample, as it was chosen on this split'}).")


def card_caption(card: dict) -> str:
    thr = ", ".join(f"{ROLE_LABEL[r].lower()} {card['models'][r].get('threshold', 0.5):.3f}" for r in ROLES)
    split = card.get("metrics_split", "validation split")
    if isinstance(split, dict):  # one description per split the card reports
        split = split.get("validation", "validation split")
    rule = card["models"]["teacher"].get("threshold_rule", "Youden's J on validation")
    return (f"From the model card. Split: {split}. Thresholds ({rule}): {thr}. "
            f"{ci_note(reports_from_card(card))} CPU ms/image measured at batch 1, "
            f"{card.get('input', {}).get('size', '?')} px.")


def result_caption(result: dict) -> str:
    thr = ", ".join(f"{ROLE_LABEL[r].lower()} {result[r]['threshold']:.3f}" for r in ROLES)
    skipped = len(result.get("skipped_unreadable") or {})
    return (f"Recomputed on split **{result['split']}** ({SPLIT_HELP.get(result['split'], '')}) of `{result['data']}`: "
            f"{result['n']} images{f', {skipped} unreadable skipped' if skipped else ''}. Thresholds from the model "
            f"card: {thr}. {ci_note(result)}")


def evaluation_key(weights_dir: Path, root: Path, split: str) -> str:
    return f"{Path(weights_dir).resolve()}|{Path(root).resolve()}|{split}"


def evaluate_split(weights_dir: Path, root: Path, split: str, progress=None,
                   n_boot: int = 1000) -> tuple[dict | None, str | None]:
    """kd.evaluate on a split, remembered in the session: (result, None) or (None, a message)."""
    from kd.distributed import resolve_device
    from kd.evaluate import evaluate_weights

    store = st.session_state.setdefault(EVAL_KEY, {})
    key = evaluation_key(weights_dir, root, split)
    if key not in store:
        try:
            store[key] = evaluate_weights(weights_dir, root, split, resolve_device("auto"), n_boot=n_boot,
                                          progress=progress)
        except (kdata.DatasetError, CheckpointError, ValueError, RuntimeError) as e:
            return None, f"Could not evaluate on {split}: {e}"
    return store[key], None


def stored_evaluation(weights_dir: Path, root: Path | None, split: str) -> dict | None:
    if root is None:
        return None
    return st.session_state.get(EVAL_KEY, {}).get(evaluation_key(weights_dir, root, split))


ROLE_COLOR = {"teacher": "#1f5f8b", "student": "#d1793b"}


def roc_figure(reports: dict[str, dict], points: dict[str, tuple[float, float]] | None = None) -> go.Figure:
    """Both ROC curves (AUC in the legend); optional markers at the current operating points."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"),
                             name="chance", hoverinfo="skip"))
    for role in ROLES:
        roc = reports[role].get("roc")
        if not roc:
            continue
        auc = reports[role].get("auc")
        fig.add_trace(go.Scatter(x=roc["fpr"], y=roc["tpr"], mode="lines", line=dict(color=ROLE_COLOR[role]),
                                 name=f"{ROLE_LABEL[role]} (AUC {auc:.3f})" if auc is not None else ROLE_LABEL[role],
                                 customdata=roc.get("thresholds"),
                                 hovertemplate="FPR %{x:.3f}, TPR %{y:.3f}, threshold %{customdata:.3f}"))
        if points and role in points:
            fpr, tpr = points[role]
            fig.add_trace(go.Scatter(x=[fpr], y=[tpr], mode="markers", marker=dict(size=11, color=ROLE_COLOR[role],
                                     line=dict(width=1, color="white")), name=f"{ROLE_LABEL[role]} at threshold"))
    fig.update_layout(title="ROC", xaxis_title="1 - specificity (false positive rate)",
                      yaxis_title="sensitivity (true positive rate)", height=380, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(range=[0, 1]), yaxis=dict(range=[0, 1.02]), legend=dict(x=0.45, y=0.05))
    return fig


def confusion_figure(cm: dict, title: str) -> go.Figure:
    z = [[cm.get("tn", 0), cm.get("fp", 0)], [cm.get("fn", 0), cm.get("tp", 0)]]
    fig = px.imshow(z, x=["NORMAL", "PNEUMONIA"], y=["NORMAL", "PNEUMONIA"], text_auto=True,
                    color_continuous_scale="Blues", labels=dict(x="predicted", y="truth", color="images"))
    fig.update_layout(title=title, height=300, margin=dict(l=10, r=10, t=40, b=10), coloraxis_showscale=False)
    return fig


def calibration_figure(reports: dict[str, dict]) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"),
                             name="perfect", hoverinfo="skip"))
    for role in ROLES:
        cal = reports[role].get("calibration") or {}
        curve = cal.get("curve") or {}
        if not curve.get("mean_predicted"):
            continue
        name = (f"{ROLE_LABEL[role]} (T={cal.get('temperature', 1):.2f}, ECE {cal.get('ece_raw', float('nan')):.3f}"
                f" -> {cal.get('ece_scaled', float('nan')):.3f})")
        fig.add_trace(go.Scatter(x=curve["mean_predicted"], y=curve["fraction_positive"], mode="lines+markers",
                                 line=dict(color=ROLE_COLOR[role]), name=name, customdata=curve.get("count"),
                                 hovertemplate="predicted %{x:.2f}, observed %{y:.2f}, %{customdata} images"))
    fig.update_layout(title="Calibration (after temperature scaling)", xaxis_title="mean predicted probability",
                      yaxis_title="fraction with pneumonia", height=380, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(range=[0, 1]), yaxis=dict(range=[0, 1.02]), legend=dict(x=0.02, y=0.98))
    return fig


def at_threshold(result: dict, threshold: float) -> dict[str, dict]:
    """binary_metrics of both models at one threshold, from the stored probabilities."""
    y = np.asarray(result["labels"])
    return {role: metrics.binary_metrics(y, np.asarray(result[role]["probabilities"]), threshold) for role in ROLES}


def threshold_table(at: dict[str, dict]) -> pd.DataFrame:
    rows = {}
    for key in ("sensitivity", "specificity", "accuracy", "precision", "f1"):
        rows[METRIC_NAMES[key]] = {ROLE_LABEL[r]: round(at[r][key], 3) for r in ROLES}
    for key in ("tp", "fn", "tn", "fp"):
        rows[key.upper()] = {ROLE_LABEL[r]: at[r]["confusion_matrix"][key] for r in ROLES}
    return pd.DataFrame(rows).T


def operating_points(at: dict[str, dict]) -> dict[str, tuple[float, float]]:
    return {r: (1 - at[r]["specificity"], at[r]["sensitivity"]) for r in ROLES}


def disagreement_frame(result: dict) -> pd.DataFrame:
    """Images where the two models disagree or at least one is wrong; disagreements first."""
    y = np.asarray(result["labels"])
    pt, ps = np.asarray(result["teacher"]["probabilities"]), np.asarray(result["student"]["probabilities"])
    dt, ds = pt >= result["teacher"]["threshold"], ps >= result["student"]["threshold"]
    rows = []
    for i, path in enumerate(result["files"]):
        t_ok, s_ok = dt[i] == y[i], ds[i] == y[i]
        if t_ok and s_ok:
            continue
        if dt[i] != ds[i]:
            reason = f"disagree ({'teacher' if t_ok else 'student'} right)"
        else:
            reason = "both wrong"
        rows.append({"file": Path(path).name, "truth": kdata.CLASSES[y[i]], "teacher p": round(float(pt[i]), 3),
                     "student p": round(float(ps[i]), 3), "reason": reason, "path": path,
                     "_order": (0 if dt[i] != ds[i] else 1, -abs(float(pt[i] - ps[i])))})
    if not rows:
        return pd.DataFrame(columns=["file", "truth", "teacher p", "student p", "reason", "path"])
    rows.sort(key=lambda r: r.pop("_order"))
    return pd.DataFrame(rows)


def faithfulness(pair: ModelPair, samples: list[kdata.Sample], method: str = "GradCAM", progress=None,
                 percentiles: tuple[int, ...] = (20, 40, 60, 80)) -> dict:
    """ROAD faithfulness of each model's maps and the mean teacher/student CAM agreement on a sample.

    `progress(fraction, text)` is called as the work goes (one ROAD pass per model); the agreement
    reuses the maps ROAD computed, averaged over the images where neither map is empty."""
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
    total, maps = len(ROLES) * n, {}
    for k, role in enumerate(ROLES):
        cb = (lambda i, m, k=k, role=role: progress((k * n + i) / total, f"ROAD, {role}: {i}/{m}")) \
            if progress else None
        scores, maps[role] = cam.road_scores(pair.models[role], np.stack(squares), method, percentiles, progress=cb)
        out["road"][role] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "scores": scores.tolist()}
    pairs = [cam.agreement(t, s) for t, s in zip(maps["teacher"], maps["student"])]
    defined = [a for a in pairs if a["correlation"] is not None]
    out["agreement"] = {key: float(np.mean([a[key] for a in defined])) if defined else None
                        for key in ("correlation", "top20_iou")}
    out["agreement"]["empty_maps"] = n - len(defined)
    return out


def empty_maps_note(res: dict) -> str:
    empty = res["agreement"].get("empty_maps", 0)
    return f" {empty} of {res['n']} images had an empty map in a model and are left out of the means." if empty else ""


def faithfulness_frame(res: dict) -> pd.DataFrame:
    return pd.DataFrame({
        ROLE_LABEL[r]: {"ROAD (mean)": round(res["road"][r]["mean"], 4), "ROAD (sd)": round(res["road"][r]["std"], 4),
                        "images": res["n"]} for r in ROLES if r in res["road"]}).T


def stored_faithfulness(key: str) -> dict | None:
    return st.session_state.get(FAITH_KEY, {}).get(key)


def store_faithfulness(key: str, value: dict) -> None:
    st.session_state.setdefault(FAITH_KEY, {})[key] = value


# ----------------------------------------------------------------------------- small page state helpers

_FLASH_KEY = "_kd_flash"
_SEEN_RUNNING_KEY = "_kd_seen_running"


def flash(kind: str, message: str) -> None:
    """A message to show once on the next run of the page (survives st.rerun)."""
    st.session_state[_FLASH_KEY] = (kind, message)


def show_flash() -> None:
    kind, message = st.session_state.pop(_FLASH_KEY, (None, None))
    if message:
        {"success": st.success, "error": st.error, "warning": st.warning}.get(kind, st.info)(message)


def job_ended_since_last_look(view: RunView) -> bool:
    """True once when the followed job stopped running since the previous look (time to refresh the page)."""
    was = st.session_state.get(_SEEN_RUNNING_KEY)
    st.session_state[_SEEN_RUNNING_KEY] = view.running
    return bool(was) and not view.running


def watch_selected(widget_key: str) -> None:
    """on_change of the 'run to show' selectbox."""
    st.session_state[WATCH_KEY] = st.session_state.get(widget_key)


def load_dataset(root: str | Path) -> tuple[dict[str, list[kdata.Sample]] | None, str | None]:
    try:
        return dataset_splits(str(root), *split_params()), None
    except kdata.DatasetError as e:
        return None, str(e)


def size_summary(sizes: pd.DataFrame) -> str:
    if sizes.empty:
        return "No readable images."
    w, h = sizes["width"], sizes["height"]
    return (f"{len(sizes)} images sampled (up to 300 per split, read from the file headers): width "
            f"{w.min()}-{w.max()} px (median {int(w.median())}), height {h.min()}-{h.max()} px (median "
            f"{int(h.median())}). Every image is stretched to a square before the models see it.")


def page_count(rows: int, per_page: int) -> int:
    return max(1, -(-rows // max(1, int(per_page))))


def page_rows(frame: pd.DataFrame, page: int, per_page: int) -> pd.DataFrame:
    """Rows of page `page` (from 1) of `frame`, `per_page` at a time."""
    start = (int(page) - 1) * int(per_page)
    return frame.iloc[start:start + int(per_page)]


def faithfulness_key(weights_dir: Path, root: Path, split: str, n: int, method: str) -> str:
    return f"{evaluation_key(weights_dir, root, split)}|{n}|{method}"


def faithfulness_sample(root: Path, split: str, n: int) -> list[kdata.Sample]:
    return stratified_sample(split_samples(root, split), n)
