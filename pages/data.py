"""Data: what is in the dataset folder (classes, patients, splits, image sizes, examples)."""
import streamlit as st

from kd import app

app.ensure_navigation()

st.title("Data")
app.show_state_problems()
root, problem = app.dataset_state()
if root is None:
    app.render_dataset_help(problem)
    st.stop()

splits, problem = app.load_dataset(root)
if problem:
    app.show_error(problem)
    st.stop()

st.subheader("Classes and patients per split")
st.dataframe(app.split_counts(splits), hide_index=True)
st.caption("`val` is carved from train/ by patient (no child on both sides, byte-identical images kept together); "
           "it is the split thresholds and model selection use. `official-val` is the dataset's own val/ folder.")

st.subheader("Image sizes")
sizes = app.image_sizes(str(root))
if not sizes.empty:
    st.plotly_chart(app.size_histogram(sizes), key="data_sizes")
st.caption(app.size_summary(sizes))

st.subheader("Examples")
c1, c2, _ = st.columns([1, 1, 2])
split = c1.selectbox("Split", list(splits), key="data_split")
per_class = c2.slider("Images per class", 2, 8, 4, key="data_per_class")
for cls, items in app.sample_thumbnails(str(root), split, per_class).items():
    st.markdown(f"**{cls}**")
    columns = st.columns(per_class)
    for column, (image, caption) in zip(columns, items):
        column.image(image, caption=caption, width="stretch")
