"""The app's plotly figures: training curves, ROC, calibration, confusion matrices, image sizes.

Each takes the frames or reports the pages already hold and returns a figure; none draws it.
"""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from kd.ui.served import ROLE_LABEL, ROLES

ROLE_COLOR = {"teacher": "#1f5f8b", "student": "#d1793b"}
EMPTY_CELL = "–"  # what a table shows where there is no value (st.dataframe would print "None")


def table(frame: pd.DataFrame):
    """A frame as st.dataframe should show it: empty cells as EMPTY_CELL, numbers at 3 decimals. The empty
    cells are replaced in the data itself: st.dataframe draws a missing value as "None" whatever the Styler's
    na_rep says (seen in the browser)."""
    filled = frame.astype(object).where(frame.notna(), EMPTY_CELL) if frame.isna().any().any() else frame
    return filled.style.format(precision=3)


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


FEW_IMAGES = 10  # a calibration bin with fewer images is drawn hollow: too few to judge by


def calibration_figure(reports: dict[str, dict]) -> go.Figure:
    """Reliability diagram per model; each bin's marker is sized by its number of images and labelled
    with it, and hollow under FEW_IMAGES, so a bin of two images is not read like one of two hundred."""
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
        counts = curve.get("count")  # older cards have none: plain markers, no made-up counts
        # counts in the hover and in the marker's size, not as text: labels of neighbouring bins overlapped
        counted = dict(
            mode="lines+markers", customdata=counts,
            marker=dict(size=[7 + 13 * (c / max(max(counts), 1)) ** 0.5 for c in counts],
                        symbol=["circle-open" if c < FEW_IMAGES else "circle" for c in counts]),
            hovertemplate="predicted %{x:.2f}, observed %{y:.2f}, n=%{customdata} images") if counts else dict(
            mode="lines+markers", hovertemplate="predicted %{x:.2f}, observed %{y:.2f}")
        fig.add_trace(go.Scatter(x=curve["mean_predicted"], y=curve["fraction_positive"], cliponaxis=False,
                                 line=dict(color=ROLE_COLOR[role]), name=name, **counted))
    fig.update_layout(title="Calibration (after temperature scaling)", xaxis_title="mean predicted probability",
                      yaxis_title="fraction with pneumonia", height=420, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(range=[-0.03, 1.03]), yaxis=dict(range=[-0.05, 1.08]),
                      legend=dict(orientation="h", x=0, y=-0.2, xanchor="left", yanchor="top"))  # below, off the points
    return fig


CALIBRATION_NOTE = (f"Each point is one bin of predicted probability (empty bins are left out), sized by its "
                    f"images; hover it for n. Hollow points hold fewer than {FEW_IMAGES} images: too few to judge "
                    "calibration by. Small splits get fewer, wider bins.")


def size_histogram(sizes: pd.DataFrame) -> go.Figure:
    long = sizes.melt(id_vars=["class"], value_vars=["width", "height"], var_name="side", value_name="pixels")
    few = long["pixels"].nunique() <= 10  # e.g. every image 224 px: bars side by side on the sizes themselves
    if few:
        long = long.assign(pixels=long["pixels"].astype(int).astype(str) + " px").sort_values("pixels")
    fig = px.histogram(long, x="pixels", color="class", facet_col="side", barmode="group" if few else "overlay",
                       nbins=None if few else 40, opacity=None if few else 0.7,
                       color_discrete_map={"NORMAL": "#4c9f70", "PNEUMONIA": "#c8553d"})
    if few:
        fig.update_xaxes(type="category")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    return fig
