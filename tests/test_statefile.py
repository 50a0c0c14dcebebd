"""State files of the wrong shape (hand-edited, half-written, another version's) read as one message,
"unreadable: <file>, <why>", never as a crash: kd.statefile and its readers, and the CLI on config.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd import progress
from kd.config import Config, preset
from kd.model_card import read_card
from kd.statefile import NUMBER, UnreadableState, list_of, object_with, read_json, read_json_lines

REPO = Path(__file__).resolve().parent.parent


def _unreadable(call) -> str:
    with pytest.raises(UnreadableState) as e:
        call()
    return str(e.value)


@pytest.mark.parametrize("content, why", [
    (b"[1, 2]", "it must be a JSON object, not [1, 2]"),
    (b'{"pid": "abc"}', "'pid' must be an integer, not \"abc\""),
    (b'{"pid": true}', "'pid' must be an integer, not true"),
    (b'{"run_dir": "r"}', "it has no 'pid'"),
    (b'{"pid": 1, "phases": ["a", 2]}', "'phases[1]' must be a string, not 2"),
    (b"", "it is empty"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    (b'{"pid": 1', "not valid JSON"),
])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, content, why):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    shape = object_with({"pid": int}, {"phases": list_of(str)})
    message = _unreadable(lambda: read_json(path, shape))
    assert message.startswith(f"unreadable: {path}, ") and why in message


def test_read_json_missing_file_is_the_default_or_says_so(tmp_path):
    assert read_json(tmp_path / "none.json", default=None) is None
    assert "it does not exist" in _unreadable(lambda: read_json(tmp_path / "none.json"))
    (tmp_path / "folder.json").mkdir()
    assert _unreadable(lambda: read_json(tmp_path / "folder.json", default=None)).startswith("unreadable: ")
    assert read_json(_write(tmp_path / "ok.json", b'{"pid": 3, "x": [1]}'), object_with({"pid": NUMBER})) == \
        {"pid": 3, "x": [1]}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_json_lines_keep_the_good_lines_and_summarise_the_bad(tmp_path):
    path = _write(tmp_path / "log.jsonl", b'{"pid": 1}\n5\n\xff\xfe\n{"pid": 2}\n\n{"pid": "x"}\n{"pid": 3}')
    records, problem = read_json_lines(path, object_with({"pid": int}))
    assert records == [{"pid": 1}, {"pid": 2}, {"pid": 3}]  # the last line parses although it has no newline yet
    assert str(problem) == (f"unreadable: {path}, 3 of 6 lines left out (line 2: it must be a JSON object, not 5)")
    records, problem = read_json_lines(_write(path, b'{"pid": 1}\n{"pid": '), object_with({"pid": int}))
    assert records == [{"pid": 1}] and problem is None  # a line being written is not a fault
    assert read_json_lines(tmp_path / "missing.jsonl") == ([], None)


# ----------------------------------------------------------------------------- the project's state files


@pytest.mark.parametrize("content, why", [
    ("[1,2]", "it must be a JSON object, not [1, 2]"),
    ('{"state": "running", "started": "abc"}', "'started' must be a number or null, not \"abc\""),
    ('{"state": "running", "phases": "finetune"}', "'phases' must be a JSON list, not \"finetune\""),
])
def test_status_of_the_wrong_shape(tmp_path, content, why):
    (tmp_path / progress.STATUS_FILE).write_text(content)
    message = _unreadable(lambda: progress.load_status(tmp_path))
    assert message == f"unreadable: {tmp_path / progress.STATUS_FILE}, {why}"
    assert progress.read_status(tmp_path) is None  # the lenient reader: as if there were none yet


@pytest.mark.parametrize("line, why", [
    (b"5", "it must be a JSON object, not 5"),
    (b'{"kind": "step"}', "it has no 'phase'"),
    (b'{"kind": "step", "phase": "finetune", "global_step": "7"}', "'global_step' must be a number"),
    (b'{"kind": "epoch", "metrics": 5}', "it has no 'phase'"),
    (b'{"kind": "epoch", "phase": "finetune", "epoch": 1, "metrics": 5}', "'metrics' must be a JSON object, not 5"),
    (b'{"kind": "epoch", "phase": "finetune", "epoch": 1, "metrics": {"auc": "high"}}', "'metrics.auc' must be"),
    (b"\x93\x00\xffrandom", "not UTF-8 text"),
    (b'{"kind": "step", "phase": "finetune", "global_step": 1, "total_steps": Infinity}',
     "'total_steps' must be a finite number, not Infinity"),
    (b'{"kind": "step", "phase": "finetune", "global_step": NaN}', "'global_step' must be a finite number, not NaN"),
])
def test_progress_lines_of_the_wrong_shape_are_left_out_and_said(tmp_path, line, why):
    good = {"kind": "step", "phase": "finetune", "epoch": 1, "step": 1, "global_step": 1, "total_steps": 2,
            "loss": 0.5}
    (tmp_path / progress.PROGRESS_FILE).write_bytes(json.dumps(good).encode() + b"\n" + line + b"\n")
    events, problem = progress.load_progress(tmp_path)
    assert events == [good]
    assert str(problem).startswith(f"unreadable: {tmp_path / progress.PROGRESS_FILE}, 1 of 2 lines left out (line 2: ")
    assert why in str(problem)
    assert progress.read_progress(tmp_path) == [good]


def test_a_model_card_of_the_wrong_shape(tmp_path, kd_tiny):
    tiny_weights = kd_tiny.weights
    (tmp_path / "model_card.json").write_text("[1]")
    assert _unreadable(lambda: read_card(tmp_path)) == \
        f"unreadable: {tmp_path / 'model_card.json'}, it must be a JSON object, not [1]"
    card = json.loads((tiny_weights / "model_card.json").read_text())
    card["models"]["teacher"]["threshold"] = "0.5"
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    assert "'models.teacher.threshold' must be a number" in _unreadable(lambda: read_card(tmp_path))
    assert read_card(tiny_weights).models["student"].file == "student.safetensors"


def test_the_shipped_model_card_reads():
    assert read_card(REPO / "weights").input.size > 0


# ----------------------------------------------------------------------------- config.json and the CLI

BAD_CONFIGS = {"a number": ("5", "it must be a JSON object, not 5"),
               "null": ("null", "it must be a JSON object, not null"),
               "a phase that is a number": ('{"pretrain": 7}', "'pretrain' must be a JSON object, not 7"),
               "a phase setting of the wrong type": ('{"finetune": {"epochs": "3"}}',
                                                     "'finetune.epochs' must be an integer, not \"3\""),
               "a string for a number": ('{"alpha": "0.5"}', "'alpha' must be a number, not \"0.5\""),
               "an unknown setting": ('{"epoch": 3}', "unknown setting epoch"),
               "not JSON": ("{", "not valid JSON")}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_load_refuses_settings_of_the_wrong_type(tmp_path, case):
    content, why = BAD_CONFIGS[case]
    path = tmp_path / "config.json"
    path.write_text(content)
    assert _unreadable(lambda: Config.load(path)).startswith(f"unreadable: {path}, {why}")


def test_config_round_trips_and_old_files_keep_defaults(tmp_path):
    cfg = preset("tiny", epochs=2)
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg
    (tmp_path / "old.json").write_text('{"preset": "cpu", "alpha": 1}')  # an integer where a float is kept
    old = Config.load(tmp_path / "old.json")
    assert old.alpha == 1.0 and isinstance(old.alpha, float) and old.temperature == Config().temperature
    with pytest.raises(ValueError, match="'pretrain' must be a JSON object"):
        Config.from_dict({"pretrain": 7})


@pytest.mark.parametrize("case", ["a number", "null", "a phase that is a number"])
def test_cli_with_a_malformed_config_says_why_without_a_traceback(tmp_path, capsys, case):
    from kd.cli import main

    content, why = BAD_CONFIGS[case]
    (tmp_path / "config.json").write_text(content)
    code = main(["pipeline", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--config", str(tmp_path / "config.json")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.strip() == f"error: unreadable: {tmp_path / 'config.json'}, {why}"


def test_cli_resume_with_a_malformed_saved_config_exits_with_the_message(tmp_path):
    """The whole command, as a person runs it: exit status 1, one line, no traceback."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"pretrain": 7}')
    done = subprocess.run([sys.executable, "-m", "kd", "finetune", "--data", str(tmp_path / "data"), "--out",
                           str(tmp_path / "run"), "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "unreadable: " in done.stderr and "'pretrain' must be a JSON object, not 7" in done.stderr


# ----------------------------------------------------------------------------- issue 21: no silent wrong answers

def _card_with(tmp_path: Path, kd_tiny, change) -> Path:
    """A copy of the tiny weights folder whose model card `change(card)` edited (written as Python's json writes
    NaN and Infinity, which is how such a card comes about)."""
    import shutil

    folder = tmp_path / "w"
    folder.mkdir()
    for f in kd_tiny.weights.iterdir():  # the served files only: the run's phase folders hold ~1 GB of states
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    card = json.loads((folder / "model_card.json").read_text())
    change(card)
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


def _set(path: str, value):
    def change(card):
        *parents, last = path.split(".")
        node = card
        for key in parents:
            node = node[key]
        node[last] = value
    return change


NAN, INF = float("nan"), float("inf")
BAD_CARD_FIELDS = {  # field: (value, words of the message)
    "models.teacher.threshold NaN": ("models.teacher.threshold", NAN, "must be a finite number, not NaN"),
    "models.student.threshold Infinity": ("models.student.threshold", INF, "must be a finite number"),
    "models.student.threshold 1.5": ("models.student.threshold", 1.5, "must be in [0, 1]"),
    "models.teacher.calibration_temperature NaN": ("models.teacher.calibration_temperature", NAN, "finite number"),
    "models.student.calibration_temperature 0": ("models.student.calibration_temperature", 0.0, "must be in (0, inf]"),
    "models.teacher.temperature -Infinity": ("models.teacher.temperature", -INF, "finite number"),
    "input.mean NaN": ("input.mean", NAN, "finite number"),
    "input.std 0": ("input.std", 0, "must be in (0, inf]"),
    "input.size 0": ("input.size", 0, "between 16 and 2048"),
    "input.contrast bogus": ("input.contrast", "bogus", "must be one of 'none', 'equalize', 'clahe'"),
    "architecture resnet9000": ("models.teacher.architecture", "resnet9000", "must be one of 'resnet18', 'resnet50'"),
    "architecture get_model_weights": ("models.student.architecture", "get_model_weights", "must be one of"),
    "architecture __class__": ("models.student.architecture", "__class__", "must be one of"),
    "file ../": ("models.teacher.file", "../teacher.safetensors", "must be a .safetensors file name in the weights"),
    "file absolute": ("models.student.file", "/etc/passwd", "must be a .safetensors file name"),
    "file a folder": ("models.student.file", "sub/student.safetensors", "must be a .safetensors file name"),
    "file not safetensors": ("models.student.file", "student.pt", "must be a .safetensors file name"),
    "a one-value CI": ("models.teacher.validation.ci.auc", [0.9], "must be a [low, high] pair, not 1 value"),
    "config.val_fraction null": ("config.val_fraction", None, "must be a number, not null"),
    "config.val_fraction NaN": ("config.val_fraction", NAN, "finite number"),
}


@pytest.mark.parametrize("case", BAD_CARD_FIELDS)
def test_a_card_with_a_non_finite_or_hostile_field_is_refused_naming_it(tmp_path, kd_tiny, case):
    field, value, why = BAD_CARD_FIELDS[case]
    folder = _card_with(tmp_path, kd_tiny, _set(field, value))
    message = _unreadable(lambda: read_card(folder))
    assert message.startswith(f"unreadable: {folder / 'model_card.json'}, '{field}'") and why in message, message


def test_kd_predict_refuses_a_nan_threshold_instead_of_saying_normal(tmp_path, kd_tiny, capsys):
    from kd.cli import main
    from tests.fixtures.xray_fixtures import xray_png

    folder = _card_with(tmp_path, kd_tiny, _set("models.teacher.threshold", NAN))
    (tmp_path / "x.png").write_bytes(xray_png())
    assert main(["predict", str(tmp_path / "x.png"), "--weights", str(folder), "--json"]) != 0
    out = capsys.readouterr()
    assert "NORMAL" not in out.out and "'models.teacher.threshold' must be a finite number, not NaN" in out.err


def test_weights_with_a_nan_tensor_are_refused(tmp_path, kd_tiny):
    from safetensors.torch import load_file, save_file

    from kd.checkpoint import CheckpointError
    from kd.serving import load_pair

    folder = _card_with(tmp_path, kd_tiny, lambda card: None)
    tensors = load_file(str(folder / "student.safetensors"))
    tensors["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(folder / "student.safetensors"))
    with pytest.raises(CheckpointError, match=r"student.safetensors holds NaN or infinite values \(in layer1.0.conv1"):
        load_pair(folder)


def test_a_symlinked_weights_file_outside_the_folder_is_not_loaded(tmp_path, kd_tiny):
    from kd.checkpoint import CheckpointError
    from kd.serving import load_pair

    folder = _card_with(tmp_path, kd_tiny, lambda card: None)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "student.safetensors").rename(outside)
    (folder / "student.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the weights folder"):
        load_pair(folder)
    (folder / "student.safetensors").unlink()
    (folder / "student.safetensors").symlink_to(folder / "student.safetensors")  # a loop
    with pytest.raises(CheckpointError, match="student.safetensors"):
        load_pair(folder)


def test_build_makes_only_the_products_architectures():
    from kd.models import build

    for name in ("resnet9000", "get_model_weights", "__class__", "vgg16"):
        with pytest.raises(ValueError, match="unknown architecture"):
            build(name)


DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deeply_nested_json_is_unreadable_not_a_recursion_error(tmp_path):
    message = _unreadable(lambda: read_json(_write(tmp_path / "deep.json", DEEP), object_with({"pid": int})))
    assert message == f"unreadable: {tmp_path / 'deep.json'}, not usable JSON (nested too deeply)"
    shallow_enough = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # decodes, but deeper than the shape check goes
    message = _unreadable(lambda: read_json(_write(tmp_path / "d2.json", shallow_enough), object_with(
        {"a": list_of(list_of(list_of(list_of(list_of(list_of(int))))))})))
    assert "unreadable: " in message
    records, problem = read_json_lines(_write(tmp_path / "deep.jsonl", b'{"pid": 1}\n' + DEEP + b"\n"),
                                       object_with({"pid": int}))
    assert records == [{"pid": 1}] and "nested too deeply" in str(problem)


def test_cli_names_a_deeply_nested_config(tmp_path):
    (tmp_path / "config.json").write_bytes(DEEP)
    r = subprocess.run([sys.executable, "-m", "kd", "pipeline", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                        "--config", str(tmp_path / "config.json")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"unreadable: {tmp_path / 'config.json'}, not usable JSON (nested too deeply)" in r.stderr


def test_a_config_saved_under_an_old_setting_name_still_loads(tmp_path):
    """augment.contrast (the augmentation's contrast jitter) is now augment.contrast_jitter, one word per meaning
    beside Config.contrast (the preprocessing's normalisation): config.json files of earlier runs still load."""
    from kd.config import Config

    (tmp_path / "config.json").write_text(json.dumps({"contrast": "equalize", "augment": {"contrast": 0.35}}))
    cfg = Config.load(tmp_path / "config.json")
    assert cfg.contrast == "equalize" and cfg.augment.contrast_jitter == 0.35
    cfg.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["augment"]["contrast_jitter"] == 0.35
