"""The dataset as the pages see it: its splits (cached per folder), their counts, image sizes, examples."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from kd import data as kdata
from kd import preprocess
from kd.config import Config
from kd.model_card import read_card
from kd.ui.state import active_weights

SPLIT_HELP = {
    "val": "patient-level validation split carved from train/ (for weights trained on this folder: what chose their "
           "thresholds)",
    "official-val": "the official val/ folder (16 images in Kermany: too small to judge by)",
    "test": "the official test/ folder",
    "train": "train/ minus the validation patients (what the models learned from)",
}


def split_params() -> tuple[float, int]:
    """val_fraction and split seed of the patient-level split: the active weights' config, else the defaults."""
    cfg = Config()
    try:
        return read_card(active_weights()).config.split
    except (OSError, ValueError):
        return cfg.val_fraction, cfg.split_seed


@st.cache_data(show_spinner="Reading the dataset (patients, duplicates)...", ttl=3600, max_entries=4)
def dataset_splits(root: str, val_fraction: float = kdata.DEFAULT_VAL_FRACTION, seed: int = 0) -> dict[str, list[kdata.Sample]]:
    """train / val (patient-level, carved from train/) / official-val / test."""
    return kdata.load_splits(root, val_fraction, seed)


def load_dataset(root: str | Path) -> tuple[dict[str, list[kdata.Sample]] | None, str | None]:
    try:
        return dataset_splits(str(root), *split_params()), None
    except kdata.DatasetError as e:
        return None, str(e)


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
        rows.append(row)
    return pd.DataFrame(rows)


def split_descriptions(splits) -> str:
    """What each split is, as a markdown list under the table (in a table cell, a sentence is cut off)."""
    return "\n".join(f"- **{name}**: {SPLIT_HELP[name]}" for name in splits if name in SPLIT_HELP)


@st.cache_data(show_spinner="Reading image sizes...", ttl=600, max_entries=4)
def image_sizes(root: str, n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Width and height (from the file header, no decoding) of a sample of every split."""
    from PIL import Image

    splits = dataset_splits(root, *split_params())
    rows = []
    for split, samples in splits.items():
        for s in kdata.stratified_sample(samples, n, seed):
            try:
                with Image.open(s.path) as im:
                    w, h = im.size
            except OSError:
                continue
            rows.append({"split": split, "class": kdata.CLASSES[s.label], "width": w, "height": h,
                         "file": Path(s.path).name})
    return pd.DataFrame(rows, columns=["split", "class", "width", "height", "file"])


def size_summary(sizes: pd.DataFrame) -> str:
    if sizes.empty:
        return "No readable images."
    w, h = sizes["width"], sizes["height"]
    return (f"{len(sizes)} images sampled (up to 300 per split, read from the file headers): width "
            f"{w.min()}-{w.max()} px (median {int(w.median())}), height {h.min()}-{h.max()} px (median "
            f"{int(h.median())}). Every image is stretched to a square before the models see it.")


@st.cache_data(show_spinner="Loading sample images...", ttl=600, max_entries=8)
def sample_thumbnails(root: str, split: str = "train", per_class: int = 4, size: int = 256,
                      seed: int = 0) -> dict[str, list[tuple[np.ndarray, str]]]:
    """Per class, a few (thumbnail, caption) pairs decoded with the app's own preprocessing; an unreadable file
    drawn for the grid gives its place to the next readable one."""
    from PIL import Image

    samples = dataset_splits(root, *split_params())[split]
    out: dict[str, list[tuple[np.ndarray, str]]] = {}
    for label, cls in enumerate(kdata.CLASSES):
        group = [s for s in samples if s.label == label]
        random.Random(f"{seed}-{cls}").shuffle(group)
        thumbs = []
        for s in group:
            if len(thumbs) == per_class:
                break
            try:
                pixels = preprocess.load_xray_file(s.path, target_size=size).pixels
            except preprocess.ImageError:
                continue
            image = Image.fromarray(pixels)
            image.thumbnail((size, size))
            thumbs.append((np.asarray(image), f"{Path(s.path).name} · patient {s.patient}"))
        out[cls] = thumbs
    return out
