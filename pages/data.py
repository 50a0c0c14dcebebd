"""Data: what is in the dataset folder (classes, patients, splits, image sizes, examples)."""
import streamlit as st

from kd.ui import data_page, figures, state

state.ensure_navigation()

st.title("Data")
state.show_state_problems()
root, problem = state.dataset_state()
if root is None:
    state.render_dataset_help(problem)
    st.stop()

splits, problem = data_page.load_dataset(root)
if problem:
    state.show_error(problem)
    st.stop()

st.subheader("Classes and patients per split")
st.dataframe(figures.table(data_page.split_counts(splits)), hide_index=True)
st.markdown(data_page.split_descriptions(splits))
st.caption("`val` is carved from train/ by patient (no child on both sides, byte-identical images kept together); "
           "it is the split thresholds and model selection use. `official-val` is the dataset's own val/ folder.")

st.subheader("Image sizes")
sizes = data_page.image_sizes(str(root))
if not sizes.empty:
    st.plotly_chart(figures.size_histogram(sizes), key="data_sizes")
st.caption(data_page.size_summary(sizes))

st.subheader("Examples")
c1, c2, _ = st.columns([1, 1, 2])
split = c1.selectbox("Split", list(splits), key="data_split")
per_class = c2.slider("Images per class", 2, 8, 4, key="data_per_class")
for cls, items in data_page.sample_thumbnails(str(root), split, per_class).items():
    st.markdown(f"**{cls}**")
    columns = st.columns(per_class)
    for column, (image, caption) in zip(columns, items):
        column.image(image, caption=caption, width="stretch")
