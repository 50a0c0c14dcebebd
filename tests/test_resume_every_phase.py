"""A run killed in any phase and resumed ends with the same weights as a run never interrupted.

Each phase seeds itself from (seed, phase) (kd.pipeline.run_phase), so a resumed run that skips the
phases already finished initialises and augments the next one exactly as the uninterrupted run did."""
import pytest
import torch
from safetensors.torch import load_file

import kd.train
from kd.config import preset
from kd.pipeline import PIPELINE, run
from tests.fixtures.xray_fixtures import write_kermany_dataset


class Killed(BaseException):
    """Stands for SIGKILL after a checkpoint: nothing of the phase's end runs."""


def _cfg(data, out):
    cfg = preset("tiny", epochs=2)
    cfg.data, cfg.out, cfg.device = str(data), str(out), "cpu"
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_kermany_dataset(tmp_path_factory.mktemp("resume") / "data", n_per_class=(8, 8), size=40)


@pytest.mark.slow(15)  # seconds on an idle machine, alone
def test_kill_in_every_phase_then_resume_gives_the_uninterrupted_weights(data, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    run(_cfg(data, tmp_path / "ref"), progress=False)

    save_state = kd.train.save_state
    for phase in PIPELINE:  # kill each phase once, after its first epoch's checkpoint, then resume
        def killing_save(state, path, phase=phase):
            save_state(state, path)
            if f"/{phase}/" in str(path) and state["epoch"] == 0:
                raise Killed(phase)

        monkeypatch.setattr(kd.train, "save_state", killing_save)
        torch.manual_seed(1234)  # whatever the process drew before: the phases must not depend on it
        with pytest.raises(Killed):
            run(_cfg(data, tmp_path / "killed"), resume=True, progress=False)
        assert not (tmp_path / "killed" / phase / "done.json").exists()
    monkeypatch.setattr(kd.train, "save_state", save_state)
    run(_cfg(data, tmp_path / "killed"), resume=True, progress=False)

    for name in ("teacher", "student", "student_baseline"):
        a = load_file(tmp_path / "ref" / f"{name}.safetensors")
        b = load_file(tmp_path / "killed" / f"{name}.safetensors")
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert a.keys() == b.keys() and not different, f"{name}: {len(different)} tensors differ"
