"""Train: start a background run, follow it live, stop or resume it, and choose the weights in use."""
import streamlit as st

from kd import app

app.ensure_navigation()
from kd.config import PRESETS, SSL_METHODS

st.title("Train")
app.show_state_problems()
app.show_flash()
root, data_problem = app.dataset_state()
if root is None:
    app.render_dataset_help(data_problem)

# ----------------------------------------------------------------------------- start a run
app.prepare_train_form()
defaults = app.preset_defaults("cpu")
with st.form("train_form", border=True):
    st.markdown("##### New run")
    c1, c2, c3 = st.columns(3)
    command_label = c1.selectbox("What to run", list(app.COMMANDS), key="train_command",
                                 help="Single phases build on the previous ones in the same run folder.")
    preset_name = c2.selectbox("Preset", list(PRESETS), index=list(PRESETS).index("cpu"), key="train_preset",
                               help="tiny: seconds, for smoke tests; cpu: about 70-90 min on 2 cores; "
                                    "gpu: about 10 min on one H100.")
    run_name = c3.text_input("Run name", key=app.RUN_NAME_KEY,
                             help="Letters, digits, '.', '_' or '-'; the run folder inside the runs folder.")
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
        "Teacher outputs during distillation", list(app.TEACHER_TARGET_LABELS), horizontal=True, index=0,
        key="train_teacher_targets", format_func=app.TEACHER_TARGET_LABELS.get,
        help="Online: the teacher sees every augmented view the student sees (consistent teaching). Cached: its "
             "outputs on each un-augmented image are computed once: faster, see the README for what it costs.")
    c1, c2, c3 = st.columns(3)
    device_label = c1.selectbox("Device", list(app.DEVICES), key="train_device")
    n_gpus = app.gpu_count()
    gpus = c2.number_input("GPUs", min_value=1, max_value=n_gpus, value=n_gpus, key="train_gpus",
                           help="More than one runs torchrun (DDP).") if n_gpus > 1 else 1
    baseline = c3.checkbox("Also train the labels-only student (ablation)", value=True, key="train_baseline")
    st.caption("Empty fields keep the preset's value for each phase. " + app.preset_summary(preset_name))
    submitted = st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:", key="train_start")

if submitted:
    form = dict(data_root=app.data_root_value(), run_name=run_name, preset_name=preset_name, epochs=epochs,
                image_size=image_size, batch_size=batch_size, temperature=temperature, alpha=alpha,
                ssl_method=ssl_method, device=app.DEVICES[device_label], baseline=baseline,
                teacher_targets=teacher_targets)
    job, error = app.start_training(form, app.COMMANDS[command_label], gpus)
    if error:
        app.show_error(error)
    else:
        st.success(f"Started {app.COMMANDS[command_label]} as run {job['run_dir']} (pid {job['pid']}).")

# ----------------------------------------------------------------------------- live progress
head, refresh_column = st.columns([4, 1], vertical_alignment="bottom")
head.subheader("Progress")
refresh = refresh_column.select_slider("Refresh every (s)", [1, 2, 5, 10], value=2, key="train_refresh")


@st.fragment(run_every=refresh if app.running_job() else None)
def live_panel():
    run_dir = app.watched_run()
    if run_dir is None:
        st.info("No runs yet: start one above.")
        return
    view = app.run_view(run_dir)
    if app.job_ended_since_last_look(view):
        st.rerun()  # the whole page: runs table, and polling off
    if not view.running:
        names = app.run_names()
        st.columns([1, 2])[0].selectbox("Run to show", names, index=names.index(view.name) if view.name in names else 0,
                                        key="train_watch_select", on_change=app.watch_selected,
                                        args=("train_watch_select",))
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Run", view.name)
    c2.metric("State", view.state)
    c3.metric("Images / s", f"{view.images_per_s:.1f}" if view.images_per_s else "-")
    c4.metric("Elapsed", view.elapsed)
    st.progress(view.fraction, text=view.progress_text)
    for problem in view.problems:
        st.warning(problem, icon=":material/warning:")
    if view.error:
        st.error(view.error)
    b1, b2, _ = st.columns([1, 1, 4])
    if view.running and view.state != "finished" and b1.button("Stop", icon=":material/stop:", key="train_stop"):
        app.flash("info", app.stop_training())
        st.rerun()
    if view.can_resume and b2.button("Resume", icon=":material/replay:", key="train_resume"):
        job, error = app.resume_training(view.name)
        if error:
            app.show_error(error)
        else:
            st.rerun()
    if not view.steps.empty:
        left, right = st.columns(2)
        left.plotly_chart(app.loss_figure(view.steps), key="train_loss_chart")
        right.plotly_chart(app.lr_figure(view.steps), key="train_lr_chart")
    if not view.epochs.empty:
        left, right = st.columns([3, 2])
        figure = app.metrics_figure(view.epochs)
        if figure is not None:
            left.plotly_chart(figure, key="train_metrics_chart")
        right.dataframe(view.epochs.round(3), hide_index=True)
    with st.expander("train.log (last lines)", expanded=view.state == "failed"):
        st.code(app.log_tail(view.path) or "(empty)", language=None)


live_panel()

# ----------------------------------------------------------------------------- runs and weights in use
st.subheader("Runs")
runs = app.list_runs()
if not runs:
    st.caption("No runs yet.")
else:
    st.dataframe(app.runs_frame(runs), hide_index=True)
    st.caption("AUC and accuracy on each run's patient-level validation split, at its own threshold.")
usable = app.usable_runs(runs)
c1, c2, c3 = st.columns([2, 1, 1], vertical_alignment="bottom")
if usable:
    chosen = c1.selectbox("Finished run with a teacher and a student", usable, key="train_use_choice")
else:
    chosen = None
    c1.caption("No finished run with both a teacher and a student yet.")
if c2.button("Use these weights", type="primary", disabled=not usable, key="train_use"):
    error = app.use_run(chosen)
    app.flash("error" if error else "success", error or f"Diagnose and Evaluate now use run {chosen}.")
    st.rerun()
if c3.button("Back to shipped weights", disabled=app.using_shipped_weights(), key="train_use_shipped"):
    app.use_shipped()
    app.flash("success", "Diagnose and Evaluate use the shipped weights again.")
    st.rerun()
st.caption(f"In use now: {app.active_label()} (`{app.active_weights()}`).")
