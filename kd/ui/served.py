"""The teacher and student of the weights in use, loaded once per weights folder for every session."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from kd.checkpoint import CheckpointError
from kd.config import DESCRIPTION
from kd.serving import ROLES, ModelPair, load_pair, no_check_reason
from kd.model_card import CARD_FILE
from kd.paths import REPO
from kd.ui.state import active_weights, shipped_weights

ROLE_LABEL = {"teacher": "Teacher", "student": "Student"}


def no_weights_message(weights_dir: Path) -> str:
    return (
        f"No model weights found in `{weights_dir}` (it has no `{CARD_FILE}`).\n\n"
        "To get weights, train them once on the Kermany dataset:\n\n"
        f"```\ncd {REPO}\npython -m kd pipeline --data /path/to/chest_xray --out {weights_dir} --preset cpu\n```\n\n"
        f"(`--preset cpu`: {DESCRIPTION['cpu']}; `--preset gpu`: {DESCRIPTION['gpu']}), "
        "or start a run on the **Train** page and click **Use these weights** when it has finished. "
        "Set the environment variable `KD_WEIGHTS` to use a weights folder elsewhere."
    )


@st.cache_resource(show_spinner="Loading teacher and student...", max_entries=2)
def _load_pair_cached(weights_dir: str, card_stamp: float) -> ModelPair:
    pair = load_pair(weights_dir)
    warm_up(pair)
    return pair


def warm_up(pair: ModelPair) -> None:
    """One dummy forward + heat map per model, once at load, so the first diagnosis does not pay for cold
    kernels and allocations (about 10 s for the teacher on 2 CPU cores)."""
    import torch

    from kd import cam

    x = torch.zeros(1, 1, pair.input_size, pair.input_size)
    for loaded in pair.models.values():
        cam.explain(loaded, x)


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


def require_refusal_check(pair: ModelPair) -> None:
    """Diagnosis needs the weights' fitted out-of-distribution check: without it the page says so and stops,
    since every picture, X-ray or not, would get a confident probability (kd.serving.no_check_reason)."""
    if pair.ood is None:
        st.error(f"**No diagnosis with these weights.** {no_check_reason(pair.weights_dir)} Or choose other "
                 "weights on the Train page.", icon=":material/block:")
        st.stop()


def clear_model_cache() -> None:
    _load_pair_cached.clear()


def weights_caption(pair: ModelPair) -> str:
    card = pair.card
    where = "shipped weights" if Path(pair.weights_dir).resolve() == shipped_weights().resolve() else \
        f"run **{Path(pair.weights_dir).name}**"
    arch = " / ".join(card.models[r].architecture for r in ROLES)
    return (f"Models: {where} ({arch}, input {pair.input_size} px, trained {(card.date or '?')[:10]}). "
            f"Decisions use each model's threshold from the model card.")


def architecture(pair: ModelPair, role: str) -> str:
    return pair.card.models[role].architecture
