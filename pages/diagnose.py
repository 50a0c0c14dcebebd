"""Diagnose: uploads or dataset cases -> teacher and student side by side with their heat maps."""
import streamlit as st

from kd.ui import data_page, diagnose, served, state

state.ensure_navigation()

st.title("Diagnose")
state.show_state_problems()
weights_status = st.container()  # filled below, once the uploader is on screen: loading the models takes seconds

left, middle, right, far = st.columns([2, 2, 1, 1], vertical_alignment="bottom")
method = left.selectbox("Heat map method", diagnose.CAM_METHODS, key="cam_method",
                        help=diagnose.CAM_HELP)
opacity = middle.slider("Heat map opacity", 0.0, 1.0, 0.4, 0.05, key="cam_opacity",
                        help="0 shows the X-ray alone.")
fade = right.checkbox("Fade by probability", value=True, key="cam_fade",
                      help="Draw each map at a strength that follows its model's probability of pneumonia.")
outline_lungs = far.checkbox("Lung outline", value=True, key="cam_lungs", help=diagnose.LUNGS_HELP)
diagnose.render_colour_scale(fade)

upload_tab, dataset_tab = st.tabs(["Upload X-rays", "Pick a dataset case"])

with upload_tab:
    files = st.file_uploader(diagnose.UPLOAD_LABEL, type=None,
                             accept_multiple_files=True, key="uploads", help=diagnose.UPLOAD_HELP)
    if not files:
        st.caption(diagnose.UPLOAD_HELP)

with weights_status:
    pair = served.require_models()
    st.caption(served.weights_caption(pair))
    served.require_refusal_check(pair)

with upload_tab:
    diagnose.render_uploads(pair, files, method, opacity, fade, outline_lungs)

with dataset_tab:
    root, data_problem = state.dataset_state()
    if root is None:
        st.info("Set a **Dataset folder** in the sidebar to pick images with their ground truth.")
        if data_problem:
            state.show_error(data_problem)
    else:
        c1, c2 = st.columns([1, 3])
        split = c1.selectbox("Split", data_page.available_splits(root), key="case_split",
                             help="val = the patient-level validation split carved from train/")
        samples = {s.path: s for s in data_page.split_samples(root, split)}
        path = c2.selectbox("Case", list(samples), index=None, key="case_path", placeholder="Choose an image...",
                            format_func=lambda p: data_page.case_label(samples[p]))
        if path:
            result = diagnose.diagnose_sample(pair, samples[path], method, memo=diagnose.session_memo())
            diagnose.render_case(result, pair, opacity, fade, outline_lungs)
