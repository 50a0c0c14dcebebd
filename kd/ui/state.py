"""What every page shares: the folders in use, the session, and the messages shown across pages.

Paths are read from the environment on every call (`KD_WEIGHTS`, `KD_RUNS_DIR`, `KD_DATA`), so a test
or a launcher can point the app elsewhere without re-importing `kd`. A state file the app relies on
(which weights are in use, the running job) that cannot be used is said under each page's title, and
the page goes on with a fallback.
"""
from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from kd import data as kdata
from kd import jobs
from kd import runs as kruns
from kd.paths import REPO, default_runs_root, default_weights
from kd.statefile import UnreadableState

ENTRY_SCRIPT = REPO / "streamlit_app.py"
DATA_KEY = "kd_data_root"  # the dataset folder, shared by every page (sidebar text input)
DATASET_HELP = (
    "This page needs the labelled dataset: *Chest X-Ray Images (Pneumonia)*, Kermany et al. 2018 "
    "(Cell 172:1122), from Mendeley Data, doi:[10.17632/rscbjbr9sj.2](https://doi.org/10.17632/rscbjbr9sj.2) "
    "(licence CC BY 4.0), or the same images on Kaggle as "
    "[chest-xray-pneumonia](https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia). "
    "Unpack it and type the folder that holds `train/` (and optionally `val/`, `test/`) into **Dataset folder** "
    "in the sidebar (or start the app with `KD_DATA=/path/to/chest_xray`)."
)
_FLASH_KEY = "_kd_flash"


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


def using_shipped_weights() -> bool:
    return active_weights() == shipped_weights()


def active_label() -> str:
    return "shipped weights" if using_shipped_weights() else f"run {active_weights().name}"


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
    is run here instead (it draws the page through `st.navigation`) and this outer run stops.

    Why a private attribute: Streamlit decides between the two mechanisms by `PagesManager.uses_pages_directory`,
    set from whether a folder named `pages` sits beside the entry script, and offers no setting to turn that
    off; its own guidance is to name the folder otherwise (`app_pages/`), which this product's layout does not
    allow (`pages/` is named in it). tests/test_app.py checks the attribute against the pinned Streamlit, so an
    upgrade that renames or drops it fails a test instead of silently bringing the legacy mechanism back."""
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


def dataset_state(path: str | None = None) -> tuple[Path | None, str | None]:
    """(root, None) for a usable dataset; (None, None) when no path is set; (None, message) when it is wrong."""
    path = data_root_value() if path is None else str(path).strip()
    if not path:
        return None, None
    return _checked_dataset(path, _folder_times(path))


def _folder_times(path: str) -> tuple:
    """Modification times of the root, its split folders and their class folders: adding, removing or renaming
    any of their entries changes one, so the cached check below is redone exactly when the layout may differ."""
    root, times = Path(path).expanduser(), []
    try:
        folders = [root, *root.glob("*"), *root.glob("*/*")]
    except (OSError, RuntimeError):  # a loop or an unreadable root: the check itself says what is wrong
        return ()
    for folder in folders:
        try:
            if folder.is_dir():
                times.append((str(folder), folder.stat().st_mtime_ns))
        except OSError:
            times.append((str(folder), None))
    return tuple(times)


@st.cache_data(show_spinner=False, max_entries=16)
def _checked_dataset(path: str, folder_times: tuple) -> tuple[Path | None, str | None]:
    """The whole layout checked (kd.data.check_layout: every split folder with both classes), so a folder a
    job would fail on is never shown as found; cached per state of its folders, as every page's rerun asks."""
    try:
        kdata.check_layout(path)
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


def flash(kind: str, message: str) -> None:
    """A message to show once on the next run of the page (survives st.rerun)."""
    st.session_state[_FLASH_KEY] = (kind, message)


def show_flash() -> None:
    kind, message = st.session_state.pop(_FLASH_KEY, (None, None))
    if message:
        {"success": st.success, "error": st.error, "warning": st.warning}.get(kind, st.info)(message)
