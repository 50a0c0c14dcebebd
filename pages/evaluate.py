"""Evaluate: teacher vs student from the model card or recomputed on a split, curves, threshold, CAMs."""
import streamlit as st

from kd import cam
from kd.ui import data_page, diagnose, evaluate_page, figures, served, state

state.ensure_navigation()

st.title("Evaluate")
state.show_state_problems()
pair = served.require_models()
card = pair.card.document
root, data_problem = state.dataset_state()

# ----------------------------------------------------------------------------- which numbers
result = None
split = None
if root is None:
    with st.expander("Recompute on a dataset split: needs the dataset", expanded=True):
        state.render_dataset_help(data_problem)
else:
    c1, c2, _ = st.columns([1, 1, 2], vertical_alignment="bottom")
    split = c1.selectbox("Split", data_page.available_splits(root), key="eval_split",
                         help=" · ".join(f"{k}: {v}" for k, v in data_page.SPLIT_HELP.items()))
    clicked = c2.button("Recompute on this split", type="primary", key="eval_run", icon=":material/calculate:")
    result = evaluate_page.stored_evaluation(pair.weights_dir, root, split)
    if clicked and result is None:
        bar = st.progress(0.0, text=f"Evaluating on {split}: decoding images...")
        result, error = evaluate_page.evaluate_split(pair, root, split,
                                                progress=lambda f: bar.progress(min(1.0, f), text=f"Evaluating on "
                                                                                                  f"{split}: {f:.0%}"))
        bar.empty()
        if error:
            state.show_error(error)
    if "test" not in data_page.available_splits(root):
        st.info(evaluate_page.NO_TEST_NOTE, icon=":material/info:")

st.subheader("Teacher vs student")
card_split = "validation"
if result is None and len(evaluate_page.card_splits(card)) > 1:
    card_split = st.radio("Model card figures on", evaluate_page.card_splits(card), horizontal=True, key="eval_card_split",
                          format_func=evaluate_page.CARD_SPLITS.get, index=evaluate_page.default_card_split(card, split))
reports = {r: result[r] for r in served.ROLES} if result else evaluate_page.reports_from_card(card, card_split)
st.dataframe(figures.table(evaluate_page.metrics_table(reports, card)))
st.caption(evaluate_page.result_caption(result) if result else evaluate_page.card_caption(card, card_split))
for kind, note in evaluate_page.overlap_notes(result) if result else []:
    getattr(st, kind)(note)

# a key and on_change keep the open tab across the reruns its sliders and pagers cause
curves, threshold_tab, disagreements_tab, faithfulness_tab = st.tabs(
    ["Curves", "Threshold", "Disagreements", "Faithfulness"], key="eval_tab", on_change="rerun")

with curves:
    left, right = st.columns(2)
    left.plotly_chart(figures.roc_figure(reports), key="eval_roc")
    right.plotly_chart(figures.calibration_figure(reports), key="eval_calibration")
    right.caption(figures.CALIBRATION_NOTE)
    columns = st.columns(2)
    for column, role in zip(columns, served.ROLES):
        column.plotly_chart(figures.confusion_figure(reports[role].get("confusion_matrix", {}),
                                                     f"{served.ROLE_LABEL[role]} at threshold "
                                                     f"{reports[role].get('threshold', 0.5):.3f}"), key=f"eval_cm_{role}")

with threshold_tab:
    if result is None:
        st.info("Recompute on a split above to move the decision threshold: it needs each image's probability.")
    else:
        threshold = st.slider("Decision threshold (both models)", 0.0, 1.0, 0.5, 0.01, key="eval_threshold")
        at = evaluate_page.at_threshold(result, threshold)
        left, right = st.columns([2, 3])
        left.dataframe(figures.table(evaluate_page.threshold_table(at)))
        left.caption("The model card thresholds: " + ", ".join(
            f"{served.ROLE_LABEL[r].lower()} {result[r]['threshold']:.3f}" for r in served.ROLES))
        right.plotly_chart(figures.roc_figure(reports, evaluate_page.operating_points(at)), key="eval_roc_threshold")

with disagreements_tab:
    if result is None:
        st.info("Recompute on a split above to list the images where the models disagree or are wrong.")
    else:
        frame = evaluate_page.disagreement_frame(result)
        if frame.empty:
            st.success("Both models are right on every image of this split.")
        else:
            st.dataframe(figures.table(frame.drop(columns=["path"])), hide_index=True)
            c1, c2, c3, c4 = st.columns(4)
            method = c1.selectbox("Heat map method", diagnose.CAM_METHODS, key="eval_cam_method")
            opacity = c2.slider("Heat map opacity", 0.0, 1.0, 0.4, 0.05, key="eval_opacity")
            per_page = c3.number_input("Images per page", 1, 10, 3, key="eval_per_page")
            pages = evaluate_page.page_count(len(frame), per_page)
            page = c4.number_input(f"Page (of {pages})", 1, pages, 1, key="eval_page")
            diagnose.render_colour_scale(True)
            for _, row in evaluate_page.page_rows(frame, page, per_page).iterrows():
                case = diagnose.diagnose_file(pair, row["path"], method, memo=diagnose.session_memo(),
                                              truth=row["truth"])
                st.caption(row["reason"])
                diagnose.render_case(case, pair, opacity)

with faithfulness_tab:
    if root is None:
        st.info("Needs the dataset (see above).")
    else:
        c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        n = c1.slider("Images (balanced sample)", 4, 16, 8, 2, key="faith_n")
        method = c2.selectbox("Heat map method", diagnose.CAM_METHODS, key="faith_method")
        if c3.button(f"Compute on {n} images of {split}", key="faith_run", icon=":material/science:"):
            bar = st.progress(0.0, text="Starting...")
            evaluate_page.compute_faithfulness(pair, root, split, n, method,
                                          progress=lambda f, text: bar.progress(min(1.0, f), text=text))
            bar.empty()
        res = evaluate_page.stored_faithfulness(evaluate_page.faithfulness_key(pair.weights_dir, root, split, n, method))
        if res is None:
            st.caption("Slow on a CPU (seconds per image and model): run it on a small sample.")
        elif not res["n"]:
            st.warning("None of the sampled images could be read.")
        else:
            st.dataframe(figures.table(evaluate_page.faithfulness_frame(res)))
            st.caption(cam.ROAD_HELP)
            a, b = st.columns(2)
            a.metric("Mean CAM correlation (teacher vs student)",
                     diagnose.agreement_text(res["agreement"]["correlation"]))
            b.metric("Mean top-20% overlap (IoU)", diagnose.agreement_text(res["agreement"]["top20_iou"]))
            st.caption(cam.AGREEMENT_HELP + evaluate_page.empty_maps_note(res))
