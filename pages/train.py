"""Train: start a background run, follow it live, stop or resume it, and choose the weights in use."""
import streamlit as st

from kd.config import DESCRIPTION, PRESETS, SSL_METHODS
from kd.ui import run_views, state, train_page

state.ensure_navigation()

st.title("Train")
state.show_state_problems()
state.show_flash()
root, data_problem = state.dataset_state()
if root is None:
    state.render_dataset_help(data_problem)

# ----------------------------------------------------------------------------- start a run
train_page.prepare_train_form()
defaults = train_page.preset_defaults("cpu")
with st.container(border=True):  # no st.form: the plan below follows every field as it changes
    st.markdown("##### New run")
    c1, c2, c3 = st.columns(3)
    command_label = c1.selectbox("What to run", list(train_page.COMMANDS), key="train_command",
                                 help="Single phases build on a finished run's earlier phase: choose it under Build on run.")
    preset_name = c2.selectbox("Preset", list(PRESETS), index=list(PRESETS).index("cpu"), key="train_preset",
                               help="\n".join(f"- **{name}**: {cost}" for name, cost in DESCRIPTION.items()))
    run_name = c3.text_input("Run name", key=train_page.RUN_NAME_KEY,
                             help="Letters, digits, '.', '_' or '-'; the run folder inside the runs folder.")
    from_run = None
    if train_page.needs_a_run(command_label):
        choices = train_page.runs_to_build_on(command_label)
        from_run = st.selectbox(
            "Build on run", choices, index=None, key="train_from_run",
            placeholder=train_page.build_on_placeholder(command_label, choices),
            help="Its teacher (for Distil the student) or pretrained backbone (for Fine-tune the teacher) is copied "
                 "into the new run with how it was trained; it must share this dataset's validation split.")
    c1, c2, c3 = st.columns(3)
    epochs = c1.number_input("Epochs (every phase)", min_value=1, max_value=1000, value=None, step=1,
                             placeholder="preset", key="train_epochs")
    image_size = c2.number_input("Image size (px)", min_value=16, max_value=1024, value=None, step=16,
                                 placeholder="preset", key="train_image_size")
    batch_size = c3.number_input("Batch size", min_value=2, max_value=4096, value=None, step=1,
                                 placeholder="preset", key="train_batch_size")
    c1, c2, c3 = st.columns(3)
    temperature = c1.number_input("Distillation temperature T", min_value=0.1, max_value=50.0,
                                  value=float(defaults["temperature"]), step=0.5, key="train_T")
    alpha = c2.slider("alpha (weight of the label loss)", 0.0, 1.0, float(defaults["alpha"]), 0.05,
                      key="train_alpha", help="1 - alpha goes to the distillation term.")
    ssl_method = c3.selectbox("SSL method", SSL_METHODS, index=SSL_METHODS.index(defaults["ssl_method"]),
                              key="train_ssl")
    teacher_targets = st.radio(
        "Teacher outputs during distillation", list(train_page.TEACHER_TARGET_LABELS), horizontal=True, index=0,
        key="train_teacher_targets", format_func=train_page.TEACHER_TARGET_LABELS.get,
        help="Online: the teacher sees every augmented view the student sees (consistent teaching). Cached: its "
             "outputs on each un-augmented image are computed once: faster, see the README for what it costs. "
             "Cached over 7 framings: its mean output over the whole image, a closer and a wider framing and four "
             "small shifts.")
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    unlabeled = c1.text_area(
        "Unlabeled X-ray folders (one per line, optional)", key="train_unlabeled", height=68,
        help="Chest X-rays without labels, searched recursively: they join SSL pretraining (the cpu preset "
             "pretrains only when some are given: on the labelled images alone it made the teacher worse). None may be a "
             "validation or test image (the run stops if one is). Licences of an outside corpus carry over to "
             "the weights: the model card lists them from the folder's manifest.csv.")
    distill_unlabeled = c2.checkbox("Distil on them too", key="train_distill_unlabeled",
                                    help="The student also matches the teacher's outputs on these images.")
    c1, c2, c3 = st.columns(3)
    device_label = c1.selectbox("Device", list(train_page.DEVICES), key="train_device")
    n_gpus = train_page.gpu_count()
    gpus = c2.number_input("GPUs", min_value=1, max_value=n_gpus, value=n_gpus, key="train_gpus",
                           help="More than one runs torchrun (DDP).") if n_gpus > 1 else 1
    baseline = c3.checkbox("Also train the labels-only student (ablation)", value=True, key="train_baseline")
    st.markdown(train_page.plan_summary(preset_name, command_label, epochs=epochs, image_size=image_size,
                                   batch_size=batch_size, ssl_method=ssl_method, baseline=baseline,
                                   unlabeled=unlabeled, distill_unlabeled=distill_unlabeled, from_run=from_run))
    submitted = st.button("Start training", type="primary", icon=":material/play_arrow:", key="train_start")

if submitted:
    train_page.submit(dict(data_root=state.data_root_value(), run_name=run_name, preset_name=preset_name, epochs=epochs,
                      image_size=image_size, batch_size=batch_size, temperature=temperature, alpha=alpha,
                      ssl_method=ssl_method, device=train_page.DEVICES[device_label], baseline=baseline,
                      teacher_targets=teacher_targets, unlabeled=unlabeled, distill_unlabeled=distill_unlabeled,
                      from_run=from_run),
                 command_label, gpus)

# ----------------------------------------------------------------------------- live progress
head, refresh_column = st.columns([4, 1], vertical_alignment="bottom")
head.subheader("Progress")
refresh = refresh_column.select_slider("Refresh every (s)", [1, 2, 5, 10], value=2, key="train_refresh")
train_page.live_panel(refresh)

# ----------------------------------------------------------------------------- runs and weights in use
st.subheader("Runs")
train_page.runs_panel(refresh)
runs = run_views.list_runs()
usable = run_views.usable_runs(runs)
c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
if usable:
    chosen = c1.selectbox("Finished run with a teacher and a student", usable, key="train_use_choice")
else:
    chosen = None
    c1.caption("No finished run with both a teacher and a student yet.")
if c2.button("Use these weights", type="primary", disabled=not usable, key="train_use"):
    train_page.use_run_and_rerun(chosen)
if c3.button("Back to shipped weights", disabled=state.using_shipped_weights(), key="train_use_shipped"):
    train_page.use_shipped_and_rerun()
st.caption(f"In use now: {state.active_label()} (`{state.active_weights()}`).")
