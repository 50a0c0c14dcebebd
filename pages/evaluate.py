"""Evaluate: teacher vs student from the model card or recomputed on a split, curves, threshold, CAMs."""
import streamlit as st

from kd import app

app.ensure_navigation()

st.title("Evaluate")
app.show_state_problems()
pair = app.require_models()
card = pair.card
root, data_problem = app.dataset_state()

# ----------------------------------------------------------------------------- which numbers
result = None
split = None
if root is None:
    with st.expander("Recompute on a dataset split: needs the dataset", expanded=True):
        app.render_dataset_help(data_problem)
else:
    c1, c2, _ = st.columns([1, 1, 2], vertical_alignment="bottom")
    split = c1.selectbox("Split", app.available_splits(root), key="eval_split",
                         help=" · ".join(f"{k}: {v}" for k, v in app.SPLIT_HELP.items()))
    clicked = c2.button("Recompute on this split", type="primary", key="eval_run", icon=":material/calculate:")
    result = app.stored_evaluation(pair.weights_dir, root, split)
    if clicked and result is None:
        bar = st.progress(0.0, text=f"Evaluating on {split}: decoding images...")
        result, error = app.evaluate_split(pair.weights_dir, root, split,
                                           progress=lambda f: bar.progress(min(1.0, f), text=f"Evaluating on "
                                                                                             f"{split}: {f:.0%}"))
        bar.empty()
        if error:
            app.show_error(error)

reports = {r: result[r] for r in app.ROLES} if result else app.reports_from_card(card)
st.subheader("Teacher vs student")
st.dataframe(app.metrics_table(reports, card))
st.caption(app.result_caption(result) if result else app.card_caption(card))

curves, threshold_tab, disagreements_tab, faithfulness_tab = st.tabs(
    ["Curves", "Threshold", "Disagreements", "Faithfulness"])

with curves:
    left, right = st.columns(2)
    left.plotly_chart(app.roc_figure(reports), key="eval_roc")
    right.plotly_chart(app.calibration_figure(reports), key="eval_calibration")
    columns = st.columns(2)
    for column, role in zip(columns, app.ROLES):
        column.plotly_chart(app.confusion_figure(reports[role].get("confusion_matrix", {}),
                                                 f"{app.ROLE_LABEL[role]} at threshold "
                                                 f"{reports[role].get('threshold', 0.5):.3f}"), key=f"eval_cm_{role}")

with threshold_tab:
    if result is None:
        st.info("Recompute on a split above to move the decision threshold: it needs each image's probability.")
    else:
        threshold = st.slider("Decision threshold (both models)", 0.0, 1.0, 0.5, 0.01, key="eval_threshold")
        at = app.at_threshold(result, threshold)
        left, right = st.columns([2, 3])
        left.dataframe(app.threshold_table(at))
        left.caption("The model card thresholds: " + ", ".join(
            f"{app.ROLE_LABEL[r].lower()} {result[r]['threshold']:.3f}" for r in app.ROLES))
        right.plotly_chart(app.roc_figure(reports, app.operating_points(at)), key="eval_roc_threshold")

with disagreements_tab:
    if result is None:
        st.info("Recompute on a split above to list the images where the models disagree or are wrong.")
    else:
        frame = app.disagreement_frame(result)
        if frame.empty:
            st.success("Both models are right on every image of this split.")
        else:
            st.dataframe(frame.drop(columns=["path"]), hide_index=True)
            c1, c2, c3, c4 = st.columns(4)
            method = c1.selectbox("Heat map method", app.CAM_METHODS, key="eval_cam_method")
            opacity = c2.slider("Heat map opacity", 0.0, 1.0, 0.4, 0.05, key="eval_opacity")
            per_page = c3.number_input("Images per page", 1, 10, 3, key="eval_per_page")
            pages = app.page_count(len(frame), per_page)
            page = c4.number_input(f"Page (of {pages})", 1, pages, 1, key="eval_page")
            for _, row in app.page_rows(frame, page, per_page).iterrows():
                case = app.diagnose_file(pair, row["path"], method, memo=app.session_memo(), truth=row["truth"])
                st.caption(row["reason"])
                app.render_case(case, pair, opacity)

with faithfulness_tab:
    if root is None:
        st.info("Needs the dataset (see above).")
    else:
        c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        n = c1.slider("Images (balanced sample)", 4, 16, 8, 2, key="faith_n")
        method = c2.selectbox("Heat map method", app.CAM_METHODS, key="faith_method")
        key = app.faithfulness_key(pair.weights_dir, root, split, n, method)
        if c3.button(f"Compute on {n} images of {split}", key="faith_run", icon=":material/science:"):
            bar = st.progress(0.0, text="Starting...")
            res = app.faithfulness(pair, app.faithfulness_sample(root, split, n), method,
                                   progress=lambda f, text: bar.progress(min(1.0, f), text=text))
            app.store_faithfulness(key, res)
            bar.empty()
        res = app.stored_faithfulness(key)
        if res is None:
            st.caption("Slow on a CPU (seconds per image and model): run it on a small sample.")
        elif not res["n"]:
            st.warning("None of the sampled images could be read.")
        else:
            st.dataframe(app.faithfulness_frame(res))
            st.caption(app.ROAD_HELP)
            a, b = st.columns(2)
            a.metric("Mean CAM correlation (teacher vs student)", app.agreement_text(res["agreement"]["correlation"]))
            b.metric("Mean top-20% overlap (IoU)", app.agreement_text(res["agreement"]["top20_iou"]))
            st.caption(app.AGREEMENT_HELP + app.empty_maps_note(res))
