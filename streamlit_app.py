"""Entry point: `streamlit run streamlit_app.py` (local only by default, see .streamlit/config.toml).

Pediatric pneumonia on chest X-rays: a ResNet50 teacher and a ResNet18 student distilled from it.
The pages only lay out widgets; their logic lives in kd/ui/ (one module per page).
"""
import streamlit as st

from kd.model_card import DISCLAIMER, INTENDED_USE
from kd.ui import state

st.set_page_config(page_title="Pneumonia KD · research tool", page_icon=":material/pulmonology:", layout="wide",
                   initial_sidebar_state="expanded")
state.init_session()

navigation = st.navigation([
    st.Page("pages/diagnose.py", title="Diagnose", icon=":material/radiology:", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/monitoring:"),
    st.Page("pages/data.py", title="Data", icon=":material/folder_open:"),
])

st.warning(f"{DISCLAIMER} {INTENDED_USE}", icon=":material/gpp_maybe:")  # once per page: not again in the sidebar

with st.sidebar:
    st.text_input("Dataset folder", key=state.DATA_KEY, placeholder="/path/to/chest_xray",
                  help="The Kermany chest_xray folder (with train/, val/, test/). Used by Train, Evaluate, Data and "
                       "to pick cases on Diagnose. Default: the KD_DATA environment variable.")
    root, problem = state.dataset_state()
    if root is not None:
        st.caption(f":material/check_circle: dataset found: `{root}`")
    elif problem:
        st.caption(f":material/error: {problem.splitlines()[0]}")
    else:
        st.caption("No dataset set: Diagnose works with uploads; the other pages explain how to get the data.")
    st.caption(f"Weights in use: {state.active_label()} (`{state.active_weights()}`)")

navigation.run()
