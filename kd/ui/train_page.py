"""The Train page's logic: the form -> a Config -> a background job; the live panel that follows a run;
stopping, resuming, and choosing the weights Diagnose and Evaluate use."""
from __future__ import annotations

import datetime
from pathlib import Path

import streamlit as st

from kd import data as kdata
from kd import jobs, preprocess
from kd import runs as kruns
from kd.config import DESCRIPTION, PHASE_COMMANDS, PRESETS, Config, builds_on, preset
from kd.serving import no_check_reason
from kd.ood import OOD_FILE
from kd.ui import figures
from kd.ui.served import clear_model_cache
from kd.ui.evaluate_page import card_summary_frame
from kd.ui.run_views import RunView, carded_runs, list_runs, log_tail, run_view, runs_frame
from kd.ui.state import dataset_state, flash, running_job, runs_root, show_error

COMMANDS = {  # the phases each runs, and which of them the preset skips, are said under the form (plan_summary)
    "Full pipeline": "pipeline",
    "SSL-pretrain the teacher": "pretrain",
    "Fine-tune the teacher": "finetune",
    "Distil the student": "distill",
}
DEVICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
TEACHER_TARGET_LABELS = {None: "The preset's choice (cpu: cached, gpu: online)",
                         "online": "Online (teacher on every augmented view)", "cached": "Cached (computed once, faster)",
                         "cached-tta": "Cached over 7 framings of each image (a steadier teacher, 7x the caching)"}
RUN_NAME_KEY = "kd_run_name"
_NEXT_RUN_NAME = "_kd_next_run_name"
WATCH_KEY = "kd_watch_run"
_SEEN_RUNNING_KEY = "_kd_seen_running"
_CONFIRM_STOP_KEY = "_kd_confirm_stop"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_run_name() -> str:
    return "run-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_train_form() -> None:
    """Before the form is drawn: a fresh default run name (after a start, a new one)."""
    if st.session_state.pop(_NEXT_RUN_NAME, False) or RUN_NAME_KEY not in st.session_state:
        st.session_state[RUN_NAME_KEY] = default_run_name()


def needed_phase(command_label: str) -> str | None:
    """The phase of an earlier run a single-phase command starts from (a new run folder has none of its own)."""
    return builds_on(PHASE_COMMANDS[COMMANDS[command_label]])


def needs_a_run(command_label: str) -> bool:
    """The command trains one phase on top of an earlier run's (its teacher, or its pretrained backbone)."""
    return needed_phase(command_label) is not None


def runs_to_build_on(command_label: str) -> list[str]:
    """The runs, newest first, that have finished the phase the command builds on (kd.pipeline.phases_to_adopt)."""
    needed = needed_phase(command_label)
    return [r["name"] for r in list_runs() if needed and (Path(r["path"]) / needed / "done.json").is_file()]


def build_on_placeholder(command_label: str, choices: list[str]) -> str:
    """What the empty "Build on run" box says: what to choose, or that there is nothing yet and what makes one."""
    what = {"finetune": "a pretrained backbone", "distill": "a fine-tuned teacher"}[COMMANDS[command_label]]
    return (f"a finished run with {what}" if choices
            else f"no run with {what} yet: run the full pipeline (or the phase before) first")


PHASE_WORDS = {"pretrain": "SSL-pretrain the teacher", "finetune": "fine-tune the teacher",
               "distill": "distil the student", "baseline": "labels-only student (ablation)"}


def folder_lines(text: str | None) -> list[str]:
    """The unlabeled-folders field, one folder per non-blank line."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def plan_summary(preset_name: str, command_label: str, epochs: int | None = None, image_size: int | None = None,
                 batch_size: int | None = None, ssl_method: str | None = None, baseline: bool = True,
                 unlabeled: str = "", distill_unlabeled: bool = False, from_run: str | None = None) -> str:
    """What Start would run with the fields as they are now: each phase's budget (the preset's, or the fields'
    when set: they apply to every phase), the run it builds on, and the phases that will not run, said as such."""
    command, needed = COMMANDS[command_label], needed_phase(command_label)
    if needed and not from_run:
        return (f"Not startable as set: {command_label} builds on the {needed} phase of a finished run: "
                "choose it under Build on run.")
    try:
        cfg = preset(preset_name, image_size=image_size or None, epochs=epochs, batch_size=batch_size or None,
                     ssl_method=ssl_method)
    except ValueError as e:
        return f"Not startable as set: {e}"
    cfg.unlabeled = folder_lines(unlabeled)
    corpus = bool(cfg.unlabeled)
    steps, skipped = [], []
    for name in PHASE_COMMANDS[COMMANDS[command_label]]:
        ph = cfg.phase(name)
        if name == "baseline" and not baseline:
            continue
        if ph.epochs == 0:
            skipped.append(f"{PHASE_WORDS[name]} (0 epochs in the {preset_name} preset; set Epochs to run it)")
            continue
        if name == "pretrain" and cfg.skips_pretraining:
            skipped.append(f"{PHASE_WORDS[name]} (the {preset_name} preset pretrains only on unlabeled folders: "
                           "add some to run it)")
            continue
        what = PHASE_WORDS[name] + (f" ({cfg.ssl_method}{', with the unlabeled folders' if corpus else ''})"
                                    if name == "pretrain" else "")
        if name == "distill" and corpus and distill_unlabeled:
            what += " (on the unlabeled folders too)"
        steps.append(f"{what}: {ph.epochs} ep @ {ph.image_size} px, batch {ph.batch_size}")
    adopted = (f"the {'fine-tuned teacher' if command == 'distill' else 'pretrained backbone'} of run "
               f"**{from_run}** (copied in, with how it was trained) → " if needed else "")
    text = (f"**This run** ({preset_name} preset: {DESCRIPTION[preset_name]}, at its own settings): " + adopted
            + (" → ".join(steps) if steps else "nothing to train")
            + (f"; then the weights are exported at {cfg.eval_image_size} px with their model card and refusal check."
               if COMMANDS[command_label] != "pretrain" else "."))
    if skipped:
        text += " Not run: " + "; ".join(skipped) + "."
    import torch

    from kd import distributed

    device = torch.device(distributed.auto_device_type())  # where a job started here trains
    if distributed.bf16_falls_back(device, cfg.cpu_bf16):  # the preset's time assumed a bf16 it will not get here
        text += f" On this machine: {distributed.training_precision(device, cfg.cpu_bf16)}, so expect the float32 time."
    return text


def preset_defaults(name: str) -> dict:
    cfg = PRESETS[name]()
    return {"temperature": cfg.temperature, "alpha": cfg.alpha, "ssl_method": cfg.ssl_method}


def build_config(data_root: str, run_name: str, preset_name: str = "cpu", epochs: int | None = None,
                 image_size: int | None = None, batch_size: int | None = None, temperature: float | None = None,
                 alpha: float | None = None, ssl_method: str | None = None, device: str = "auto",
                 baseline: bool = True, teacher_targets: str | None = None, unlabeled: str = "",
                 distill_unlabeled: bool = False, from_run: str | None = None) -> Config:
    """The one Config the CLI would build from the same choices; raises DatasetError / JobError / ValueError.

    None keeps the preset's value (epochs, image size and batch size then differ per phase). `unlabeled`: folders
    of X-rays without labels, one per line (the CLI's --unlabeled), each checked to hold pictures. `from_run`: the
    name of a run in the runs folder to build on (the CLI's --from-run)."""
    kdata.check_layout(data_root)  # the whole layout, before any job starts
    root = kdata.check_root(data_root)
    folders = folder_lines(unlabeled)
    for folder in folders:
        if not kdata.list_unlabeled([folder]):
            raise kdata.DatasetError(f"Unlabeled folder {folder} holds no pictures ({preprocess.FORMAT_NAMES}).")
    run_dir = kruns.run_dir_for(run_name, runs_root())
    if device not in DEVICES.values():
        raise ValueError(f"Unknown device {device!r}")
    if device == "cuda" and gpu_count() == 0:
        raise ValueError("GPU was chosen but no GPU is visible to this machine; choose Auto or CPU.")
    cfg = preset(preset_name, image_size=image_size or None, epochs=epochs, batch_size=batch_size or None,
                 temperature=temperature, alpha=alpha, ssl_method=ssl_method, teacher_targets=teacher_targets)
    cfg.data, cfg.out, cfg.device, cfg.baseline = str(root.resolve()), str(run_dir), device, bool(baseline)
    cfg.unlabeled = [str(Path(f).expanduser().resolve()) for f in folders]
    cfg.distill_unlabeled = bool(distill_unlabeled)
    if from_run:
        cfg.from_run = str(kruns.run_dir_for(from_run, runs_root()).resolve())
    cfg.validate()
    return cfg


def start_training(form: dict, command: str, gpus: int = 1) -> tuple[dict | None, str | None]:
    """Start a job from the form's values: (job record, None) or (None, the message to show)."""
    try:
        cfg = build_config(**form)
        cfg.runnable_phases(PHASE_COMMANDS[command])  # pretraining alone, where the preset needs a corpus: refused
        needed = builds_on(PHASE_COMMANDS[command])
        if needed and not cfg.from_run:  # else the job would fail at once on the missing teacher
            raise ValueError(f"This command builds on the {needed} phase of a finished run: choose the run under "
                             "Build on run (a new run folder has no teacher of its own).")
        run_dir = Path(cfg.out)
        if running_job() is None and run_dir.exists() and any(run_dir.iterdir()):
            raise jobs.JobError(f"A run named {run_dir.name} already exists: choose another run name, or select it "
                                "below and Resume it if it was stopped.")
        record = jobs.start_job(cfg, command, gpus=max(1, int(gpus)), runs_root=runs_root())
    except (kdata.DatasetError, kruns.RunError, ValueError, OSError) as e:
        return None, str(e)
    st.session_state[WATCH_KEY] = Path(record["run_dir"]).name
    st.session_state[_NEXT_RUN_NAME] = True
    return record, None


def stop_training() -> str:
    return "Stopped; the last finished epoch is kept (Resume continues from it)." if jobs.stop_job(runs_root()) \
        else "No job was running."


def confirm_stop(view: RunView) -> None:
    """Stop asks first, says what is kept, and shows that it is working while the process ends."""
    with st.container(border=True):
        st.warning(f"Stop run **{view.name}**? {stop_keeps(view)} Resume continues from there.",
                   icon=":material/help:")
        yes, no, _ = st.columns([1, 1, 3])
        if yes.button("Yes, stop it", type="primary", key="train_stop_confirm"):
            st.session_state.pop(_CONFIRM_STOP_KEY, None)
            with st.spinner(f"Stopping {view.name}: waiting for the training process to end..."):
                message = stop_training()
            flash("info", message)
            st.rerun()
        if no.button("Keep running", key="train_stop_cancel"):
            st.session_state.pop(_CONFIRM_STOP_KEY, None)
            st.rerun(scope="fragment")


def stop_keeps(view: RunView) -> str:
    """What a stop now keeps: finished phases, and the current phase's last finished epoch."""
    done = [str(e["phase"]) for e in view.epochs.to_dict("records")] if not view.epochs.empty else []
    phase = view.status.get("phase")
    finished_epochs = sum(1 for p in done if p == phase)
    if phase and finished_epochs:
        return f"The last finished epoch of {phase} (epoch {finished_epochs}) and every finished phase are kept."
    if phase:
        return f"Every finished phase is kept; {phase} has no finished epoch yet and starts again."
    return "Nothing has been trained yet."


def resume_training(run_name: str) -> tuple[dict | None, str | None]:
    try:
        record = jobs.resume_job(kruns.run_dir_for(run_name, runs_root()), runs_root())
    except (kruns.RunError, ValueError, OSError) as e:
        return None, str(e)
    st.session_state[WATCH_KEY] = run_name
    return record, None


def watched_run() -> Path | None:
    """The run the live view follows: the running job, else the one chosen, else the newest."""
    root = runs_root()
    job = running_job()
    if job:
        return Path(job["run_dir"])
    name = st.session_state.get(WATCH_KEY)
    if name and (root / name).is_dir():
        return root / name
    runs = kruns.list_runs(root)
    return Path(runs[0]["path"]) if runs else None


def run_names() -> list[str]:
    return [r["name"] for r in kruns.list_runs(runs_root())]


def job_ended_since_last_look(view: RunView) -> bool:
    """True once when the followed job stopped running since the previous look (time to refresh the page)."""
    was = st.session_state.get(_SEEN_RUNNING_KEY)
    st.session_state[_SEEN_RUNNING_KEY] = view.running
    return bool(was) and not view.running


def watch_selected(widget_key: str) -> None:
    """on_change of the 'run to show' selectbox."""
    st.session_state[WATCH_KEY] = st.session_state.get(widget_key)


def use_run(name: str) -> str | None:
    """Activate a finished run's weights for Diagnose and Evaluate; returns an error message or None."""
    try:
        kruns.activate(kruns.run_dir_for(name, runs_root()), runs_root())
    except (kruns.RunError, OSError) as e:
        return str(e)
    clear_model_cache()
    return None


def use_shipped() -> None:
    kruns.reset_active(runs_root())
    clear_model_cache()


def submit(form: dict, command_label: str, gpus: int = 1) -> None:
    """The form's Start button: start the job, or say why it could not start."""
    job, error = start_training(form, COMMANDS[command_label], gpus)
    if error and error == dataset_state(form["data_root"])[1]:  # already said at the top, with the layout
        st.error("Not started: the dataset folder is not usable (see above).")
    elif error:
        show_error(error)
    else:
        st.success(f"Started {COMMANDS[command_label]} as run {job['run_dir']} (pid {job['pid']}).")


def use_run_and_rerun(name: str) -> None:
    error = use_run(name)
    if error:
        flash("error", error)
    elif not (kruns.run_dir_for(name, runs_root()) / OOD_FILE).exists():  # exported before runs fitted their own
        flash("warning", f"Evaluate now uses run {name}, but Diagnose will not: it has no fitted out-of-distribution "
                         f"check, so no probability is given. {no_check_reason(kruns.run_dir_for(name, runs_root()))}")
    else:
        flash("success", f"Diagnose and Evaluate now use run {name}.")
    st.rerun()


def use_shipped_and_rerun() -> None:
    use_shipped()
    flash("success", "Diagnose and Evaluate use the shipped weights again.")
    st.rerun()


def live_panel(refresh: float) -> None:
    """The followed run (watched_run), redrawn every `refresh` seconds while a job runs: a fragment, so
    polling redraws this panel and not the page."""
    st.fragment(_live_panel, run_every=refresh if running_job() else None)()


def _live_panel() -> None:
    run_dir = watched_run()
    if run_dir is None:
        st.info("No runs yet: start one above.")
        return
    view = run_view(run_dir)
    if job_ended_since_last_look(view):
        st.rerun()  # the whole page: runs table, and polling off
    if not view.running:
        names = run_names()
        st.columns([1, 2])[0].selectbox("Run to show", names, index=names.index(view.name) if view.name in names else 0,
                                        key="train_watch_select", on_change=watch_selected,
                                        args=("train_watch_select",))
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Run", view.name)
    c2.metric("State", view.state)
    c3.metric("Images / s", f"{view.images_per_s:.1f}" if view.images_per_s else "-")
    c4.metric("Elapsed", view.elapsed)
    st.progress(view.fraction, text=view.progress_text)
    if view.status.get("precision"):
        st.caption(f"Training precision: {view.status['precision']}")
    for problem in view.problems:
        st.warning(problem, icon=":material/warning:")
    if view.error:
        st.error(view.error)
    b1, b2, _ = st.columns([1, 1, 4])
    if view.running and view.state != "finished":
        if b1.button("Stop", icon=":material/stop:", key="train_stop"):
            st.session_state[_CONFIRM_STOP_KEY] = view.name
        if st.session_state.get(_CONFIRM_STOP_KEY) == view.name:
            confirm_stop(view)
    else:
        st.session_state.pop(_CONFIRM_STOP_KEY, None)
    if view.resume_problem:
        st.info(f"Resume is not offered: it would fail again. {view.resume_problem} Fix that, then Resume appears; "
                "or start a new run.", icon=":material/info:")
    if view.can_resume and b2.button("Resume", icon=":material/replay:", key="train_resume"):
        _, error = resume_training(view.name)
        if error:
            show_error(error)
        else:
            st.rerun()
    if not view.steps.empty:
        left, right = st.columns(2)
        left.plotly_chart(figures.loss_figure(view.steps), key="train_loss_chart")
        right.plotly_chart(figures.lr_figure(view.steps), key="train_lr_chart")
    if not view.epochs.empty:
        left, right = st.columns([3, 2])
        figure = figures.metrics_figure(view.epochs)
        if figure is not None:
            left.plotly_chart(figure, key="train_metrics_chart")
        right.dataframe(figures.table(view.epochs), hide_index=True)
    with st.expander("train.log (last lines)", expanded=view.state == "failed"):
        st.code(log_tail(view.path) or "(empty)", language=None)


def runs_panel(refresh: float) -> None:
    """The runs table (redrawn every `refresh` seconds while a job runs, so its state follows the live
    panel's) and the model card of a chosen finished run."""
    st.fragment(_runs_panel, run_every=refresh if running_job() else None)()


def _runs_panel() -> None:
    runs = list_runs()
    if not runs:
        st.caption("No runs yet.")
        return
    job = running_job()
    st.dataframe(figures.table(runs_frame(runs, job)), hide_index=True, key="train_runs_table",
                 column_config={"run": st.column_config.TextColumn(width="large")})  # names in full
    st.caption("AUC and accuracy on each run's patient-level validation split, at its own threshold. Elapsed: "
               "wall-clock time over every session of the run; training time: the phases' epochs alone.")
    carded = carded_runs(runs)
    if not carded:
        return
    with st.expander("Model cards of finished runs", expanded=False):
        name = st.selectbox("Run", carded, key="train_card_run")
        card = next(r["card"] for r in runs if r["name"] == name)
        st.dataframe(figures.table(card_summary_frame(card)), hide_index=True)
        st.markdown(card_note(card))
        st.json(card, expanded=False)


def card_note(card: dict) -> str:
    """The card's provenance as a list: when, the command that makes these weights, what each split is."""
    lines = [f"- **Written:** {str(card.get('date', '?')).replace('T', ' ')}"]
    if card.get("reproduce"):
        lines.append(f"- **Reproduce** (into a new run folder): `{card['reproduce']}`")
    splits = card.get("metrics_split")
    if isinstance(splits, dict):
        lines += [f"- **{k}:** {v}" for k, v in splits.items()]
    return "\n".join(lines)
