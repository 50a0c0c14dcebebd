"""The benchmarks' interleaved timing judges the median (fake clock), and the benchmarks run end to end
(tiny sizes; figures unchecked)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


class FakeClock:
    """A clock that moves only when fake work is done: deterministic timings for the timing helpers."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float) -> None:
        self.now += seconds


def fake_rates(clock: FakeClock, seconds_per_call: dict[str, list[float]]) -> dict:
    """Variants for common.interleaved: each returns calls/s from common.seconds on the fake clock; round i
    of variant v costs seconds_per_call[v][i] a call (other work on the machine makes some rounds slower)."""
    import common

    def variant(name):
        rounds = iter(seconds_per_call[name])

        def measure():
            cost = next(rounds)
            return 1 / common.seconds(lambda: clock.work(cost), repeats=3, warmup=1, clock=clock)
        return measure
    return {name: variant(name) for name in seconds_per_call}


def test_interleaved_alternates_the_variants():
    import common

    calls = []
    out = common.interleaved({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert out == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}


def test_a_noisy_pair_does_not_flip_the_verdict(capsys):
    import common

    clock = FakeClock()
    # ours runs at 0.95 x model-only, except in pair 2, where other work slowed ours alone 2.2-fold
    rates = common.interleaved(fake_rates(clock, {"model-only": [0.95, 0.95, 0.95], "ours": [1.0, 2.2, 1.0]}), 3)
    r = common.ratio(rates["ours"], rates["model-only"])
    assert r.values == pytest.approx((0.95, 0.95 / 2.2, 0.95))
    assert r.median == pytest.approx(0.95) and r.low == pytest.approx(0.95 / 2.2) and r.high == pytest.approx(0.95)
    line = common.target("data_path", r, 0.9)
    assert line.startswith("TARGET data_path 0.95 >=0.9") and line.endswith("PASS")
    assert "median of 3 pairs, range 0.43-0.95" in capsys.readouterr().out
    # and a pair disturbed the other way does not turn a slow data path into a PASS
    clock = FakeClock()
    rates = common.interleaved(fake_rates(clock, {"model-only": [0.8, 2.0, 0.8], "ours": [1.0, 1.0, 1.0]}), 3)
    assert common.target("data_path", common.ratio(rates["ours"], rates["model-only"]), 0.9).endswith("FAIL")


def test_a_target_needs_three_pairs():
    import common

    with pytest.raises(ValueError, match="at least 3 pairs"):
        common.target("speedup", common.Ratio((2.0, 3.0)), 2.5)
    assert common.target("seconds", 0.2, 1.0, higher_is_better=False).endswith("PASS")  # plain figures as before


def test_teacher_cache_bench_compares_both_arms(tiny_dataset, tmp_path, capsys):
    import teacher_cache

    r = teacher_cache.main(["--data", str(tiny_dataset), "--teacher", str(tmp_path / "none.safetensors"),
                            "--epochs", "1", "--size", "32", "--batch", "4", "--eval-size", "32",
                            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "randomly initialised teacher" in out and "cached vs online" in out
    assert r["online"]["cache_s"] < 1e-3 < r["cached"]["cache_s"]  # only the cached arm runs the teacher first
    for arm in ("online", "cached"):
        assert 0 <= r[arm]["auc"] <= 1 and r[arm]["epochs"] == 1
    diff, lo, hi = r["auc_difference"]
    assert lo <= diff <= hi


def test_resolution_bench_reports_each_phase(capsys):
    import resolution

    r = resolution.main(["--batch", "2", "--steps", "1", "--pairs", "1", "--images", "100", "--full-size", "48"])
    assert set(r["phases"]) == {"pretrain", "finetune", "distill"}
    assert all(v["low"] > 0 and v["full"] > 0 for v in r["phases"].values())
    assert "of the training time saved" in capsys.readouterr().out


def test_onnx_runtime_export_matches_pytorch():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import inference
    import torch

    from kd.models import build_student

    model = build_student().eval()
    rate, diff = inference.onnx_rate(inference.onnx_session(model, threads=1), model, batch=2, repeats=1)
    assert rate > 0 and diff < 1e-3


@pytest.mark.slow(11)  # seconds on an idle machine, alone
def test_app_memory_bench_measures_a_real_server(capsys):
    import app_memory

    if not Path(app_memory.CHROMIUM).exists():
        pytest.skip(f"no chromium at {app_memory.CHROMIUM} (apt-get install chromium)")
    r = app_memory.main(["--files", "1"])
    assert r["files"] == 1 and 0 < r["idle_mib"] < r["loaded_mib"] <= r["peak_mib"]
    assert "X-rays diagnosed" in capsys.readouterr().out


@pytest.mark.slow(20)  # two real servers and a browser
def test_app_start_bench_times_the_uploader_and_the_models(capsys):
    import app_start

    if not Path(app_start.CHROMIUM).exists():
        pytest.skip(f"no chromium at {app_start.CHROMIUM} (apt-get install chromium)")
    out = app_start.main(["--before", str(app_start.common.REPO), "--pairs", "1"])  # this checkout against itself
    now = out["median"]["now"]
    assert 0 < now[0] <= now[1] + 0.5 and len(out["ratios"]) == 1  # the uploader comes no later than the models
    assert "to the uploader: before" in capsys.readouterr().out


def test_a_finished_run_is_recorded_as_a_look_at_the_test_split(tiny_run, tmp_path):
    """bench/recipes_table.py --record: a run made outside bench/recipes.py joins the table of looks."""
    import json

    import recipes
    import recipes_table

    looks = recipes.record_run(tiny_run[1], "tiny-reference", "the tiny preset", "cpu")
    path = tmp_path / "looks-1-tiny-reference.json"
    path.write_text(json.dumps(looks))
    table = recipes_table.render([path])
    assert "Looks at the test split so far: 3 " in table  # teacher, student, labels-only student
    assert "| tiny-reference | the tiny preset | teacher | finished |" in table
    assert looks["rows"][0]["config"]["preset"] == "tiny" and looks["scale"] == "tiny"


def test_other_looks_at_the_test_split_are_listed_and_counted(tiny_run, tmp_path):
    import json

    import recipes
    import recipes_table

    path = tmp_path / "looks-1-tiny-reference.json"
    path.write_text(json.dumps(recipes.record_run(tiny_run[1], "tiny-reference", "the tiny preset", "cpu")))
    other = {"date": "d", "what": "a paired difference", "run": "r", "command": "c", "figure": "+0.01"}
    table = recipes_table.render([path], [other])
    assert "Looks at the test split so far: 4 (3 model x recipe rows" in table
    assert "| d | a paired difference | r | `c` | +0.01 |" in table


def test_kd_transfer_compares_students_and_a_teacher_ensemble(tiny_run, tmp_path, capsys):
    """bench/kd_transfer.py: distilled vs labels-only student, the teacher, and with --ensemble a mean of
    teachers trained with other seeds on the same validation split (a run on another split is refused).
    The ensemble's other member here is the run's own teacher under another seed's name: the mechanics,
    not the figures, are under test."""
    import json

    import kd_transfer

    data, weights = tiny_run
    member = tmp_path / "seed1"
    member.mkdir()
    (member / "teacher.safetensors").symlink_to(weights / "teacher.safetensors")
    card = json.loads((weights / "model_card.json").read_text())
    card["config"]["seed"] = 1
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "test",
                             "--n-boot", "50", "--ensemble", str(member)]) == 0
    out = capsys.readouterr().out
    assert "teacher_seed1" in out and "teacher_ensemble" in out
    for line in ("student - student_baseline", "teacher_ensemble - student_baseline", "teacher_ensemble - teacher"):
        assert out.count(line) == 2, line  # validation and test
    card["config"]["split_seed"] = 5  # as if trained with --split-seed 5
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val",
                             "--ensemble", str(member)]) == 1
    assert "not one recipe" in capsys.readouterr().out



def test_kd_transfer_scores_each_model_over_test_time_views_too(tiny_run, capsys):
    """--tta: each model also as its mean logit over kd.augment.TTA_VIEWS, and the TTA teacher against the
    labels-only student (scored either way) and against the plain teacher."""
    import re

    import kd_transfer

    data, weights = tiny_run
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--tta"]) == 0
    out = capsys.readouterr().out
    aucs = dict(re.findall(r"(\w+) (0\.\d{4}|1\.0000)", out.split("AUC", 1)[1].splitlines()[0]))
    assert {"teacher", "teacher_tta", "student_tta", "student_baseline_tta"} <= set(aucs)
    for line in ("teacher_tta - teacher", "teacher_tta - student_baseline:", "teacher_tta - student_baseline_tta",
                 "student_tta - student"):
        assert line in out, line


def _one_model_run(weights, folder, role: str, as_role: str = "student", **config) -> dict:
    """A run folder whose only model, its `as_role`, is the tiny run's `role` model, its card's config changed by
    `config` (as if trained with those settings); returns that card."""
    import json

    folder.mkdir()
    card = json.loads((weights / "model_card.json").read_text())
    card["config"].update(config)
    card["models"] = {as_role: card["models"][role]}
    (folder / card["models"][as_role]["file"]).symlink_to(weights / card["models"][as_role]["file"])
    (folder / "model_card.json").write_text(json.dumps(card))
    return card

def _seed_run(weights, folder, seed: int) -> dict:
    """A run folder holding the tiny run's three models under a card that says training seed `seed` (as if the
    recipe had been trained again with it); returns that card."""
    import json

    folder.mkdir()
    for name in ("student.safetensors", "student_baseline.safetensors", "teacher.safetensors"):
        (folder / name).symlink_to(weights / name)
    card = json.loads((weights / "model_card.json").read_text())
    card["config"]["seed"] = seed
    (folder / "model_card.json").write_text(json.dumps(card))
    return card


def test_kd_transfer_compares_a_variant_runs_distilled_student(tiny_run, tmp_path, capsys):
    """--variant: the distilled student of a run of the same recipe and seed with one lever changed, against this
    run's and against the labels-only student; the run's own student under the variant's name compares to +0.0000,
    and a run of another seed is refused."""
    import json

    import kd_transfer

    data, weights = tiny_run
    member = tmp_path / "variant"
    card = _one_model_run(weights, member, "student", teacher_targets="cached-tta")
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--variant", str(member)]) == 0
    out = capsys.readouterr().out
    assert "student_variant - student: +0.0000 (95% CI +0.0000 to +0.0000)" in out
    assert "student_variant - student_baseline:" in out
    card["config"]["seed"] = 3
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val",
                             "--variant", str(member)]) == 1
    assert "not a run of this recipe and seed" in capsys.readouterr().out


def test_kd_transfer_pools_distillation_over_seeds(tiny_run, tmp_path, capsys):
    """--seeds: each run's distilled - labels-only (and teacher - labels-only), then the mean over the seeds with its
    pooled CI; the same run under another seed's name pools to its own difference. A run without a labels-only
    student is said to be left out of what needs one; one without a student is refused."""
    import json
    import re

    import kd_transfer

    data, weights = tiny_run
    member = tmp_path / "seed1"
    card = _seed_run(weights, member, 1)
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--seeds", str(member)]) == 0
    out = capsys.readouterr().out
    own = re.search(r"seed 0: .*distilled - labels-only ([+-][0-9.]+)", out).group(1)
    assert re.search(r"seed 1: .*distilled - labels-only ([+-][0-9.]+)", out).group(1) == own
    assert f"over seeds 0, 1: distilled - labels-only {own} (pooled 95% CI" in out
    teacher = re.search(r"seed 0: teacher .*teacher - labels-only ([+-][0-9.]+)", out).group(1)
    assert re.search(r"seed 1: teacher .*teacher - labels-only ([+-][0-9.]+)", out).group(1) == teacher
    assert f"over seeds 0, 1: teacher - labels-only {teacher} (pooled 95% CI" in out
    # each seed's teacher against a plain one of its seed: here itself, so pretraining "adds" exactly nothing
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--seeds", str(member), "--plain-teachers", str(weights), str(member)]) == 0
    out = capsys.readouterr().out
    assert "seed 1: teacher" in out and "pretrained teacher - plain teacher +0.0000" in out
    assert "over seeds 0, 1: pretrained teacher - plain teacher +0.0000 (pooled 95% CI +0.0000 to +0.0000)" in out
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--seeds", str(member),
                             "--plain-teachers", str(member), str(weights)]) == 1
    assert "not a run of this recipe trained with seed 0: not its pair" in capsys.readouterr().out
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val",
                             "--plain-teachers", str(weights), str(member)]) == 1
    assert "needs one run per seed (0), in that order" in capsys.readouterr().out
    del card["models"]["student_baseline"]  # trained with --no-baseline: said, and left out of what needs one
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--seeds", str(member)]) == 0
    out = capsys.readouterr().out
    assert "run(s) 1 have no labels-only student: left out of the comparisons with one" in out
    assert "over seeds" not in out
    full = tmp_path / "seed2"  # beside a complete run the comparisons pool over the runs that have one
    _seed_run(weights, full, 2)
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--seeds", str(member), str(full)]) == 0
    out = capsys.readouterr().out
    assert f"over seeds 0, 2: distilled - labels-only {own} (pooled 95% CI" in out
    assert "over seeds 0, 1, 2" not in out
    del card["models"]["student"]
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val",
                             "--seeds", str(member)]) == 1
    assert "not one recipe" in capsys.readouterr().out


def test_kd_transfer_pools_a_variant_over_seeds(tiny_run, tmp_path, capsys):
    """--variants: one variant run per seed (the weights' seed first); each seed's variant student against its
    distilled and labels-only students, then pooled. Each seed's own student under the variant's name pools to
    +0.0000 against the distilled one and to distillation's own gain against the labels-only one; variants in the
    wrong order, or too few, are refused."""
    import re

    import kd_transfer

    data, weights = tiny_run
    member = tmp_path / "seed1"
    card = _seed_run(weights, member, 1)
    variants = [tmp_path / "variant0", tmp_path / "variant1"]
    _one_model_run(weights, variants[0], "student", distill_unlabeled=True)
    _one_model_run(weights, variants[1], "student", distill_unlabeled=True, seed=1)
    args = ["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50", "--seeds", str(member)]
    assert kd_transfer.main(args + ["--variants", *map(str, variants)]) == 0
    out = capsys.readouterr().out
    gain = re.search(r"over seeds 0, 1: distilled - labels-only ([+-][0-9.]+)", out).group(1)
    assert re.search(r"seed 1: student_variant .*variant - distilled \+0\.0000", out)
    assert "over seeds 0, 1: variant - distilled +0.0000 (pooled 95% CI +0.0000 to +0.0000)" in out
    assert f"over seeds 0, 1: variant - labels-only {gain} (pooled 95% CI" in out
    assert kd_transfer.main(args + ["--variants", *map(str, variants[::-1])]) == 1
    assert "not a run of this recipe trained with seed 0: not its pair" in capsys.readouterr().out
    assert kd_transfer.main(args + ["--variants", str(variants[0])]) == 1
    assert "--variants needs one run per seed (0, 1), in that order" in capsys.readouterr().out
    assert kd_transfer.main(args + ["--variants", *map(str, variants), "--variant", str(variants[0])]) == 1
    assert "--variants and --variant both name the weights' seed's variant" in capsys.readouterr().out


def test_kd_transfer_pools_a_teacher_lever_over_seeds(tiny_run, tmp_path, capsys):
    """--teacher-variants: one run per seed with a lever of the teacher's changed; its teacher against that seed's
    teacher and labels-only student, per seed and pooled. Each seed's own teacher under the variant's name pools to
    +0.0000 against the teacher and to the teacher's own margin over the labels-only student; a run holding no
    teacher, or of another seed, is refused."""
    import re

    import kd_transfer

    data, weights = tiny_run
    member = tmp_path / "seed1"
    _seed_run(weights, member, 1)
    variants = [tmp_path / "pt0", tmp_path / "pt1"]
    _one_model_run(weights, variants[0], "teacher", "teacher", pretrain={"epochs": 16})
    _one_model_run(weights, variants[1], "teacher", "teacher", pretrain={"epochs": 16}, seed=1)
    args = ["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50", "--seeds", str(member)]
    assert kd_transfer.main(args + ["--teacher-variants", *map(str, variants)]) == 0
    out = capsys.readouterr().out
    margin = re.search(r"over seeds 0, 1: teacher - labels-only ([+-][0-9.]+)", out).group(1)
    assert "teacher_variant - teacher: +0.0000 (95% CI +0.0000 to +0.0000)" in out
    assert re.search(r"seed 1: teacher_variant .*teacher variant - teacher \+0\.0000", out)
    assert "over seeds 0, 1: teacher variant - teacher +0.0000 (pooled 95% CI +0.0000 to +0.0000)" in out
    assert f"over seeds 0, 1: teacher variant - labels-only {margin} (pooled 95% CI" in out
    assert kd_transfer.main(args + ["--teacher-variants", *map(str, variants[::-1])]) == 1
    assert "not a run of this recipe trained with seed 0: not its pair" in capsys.readouterr().out
    student_only = tmp_path / "student-only"
    _one_model_run(weights, student_only, "student")
    assert kd_transfer.main(args + ["--teacher-variants", str(student_only), str(variants[1])]) == 1
    assert "not one recipe" in capsys.readouterr().out


def test_kd_transfer_keeps_two_runs_of_one_training_seed_apart(tiny_run, tmp_path, capsys):
    """--seeds with two runs of the same training seed (e.g. one from another pretraining seed): each keeps its own
    models under its own label, so the second does not overwrite the first in the per-run lines or in the pool;
    their plain teachers pair by the seed each was trained with."""
    import json
    import re

    import kd_transfer

    data, weights = tiny_run
    card = json.loads((weights / "model_card.json").read_text())
    card["config"]["seed"] = 1
    runs = {}
    for name, student in (("seed1", "student.safetensors"), ("seed1b", "student_baseline.safetensors")):
        runs[name] = member = tmp_path / name
        member.mkdir()
        (member / "student.safetensors").symlink_to(weights / student)  # seed1b: its "distilled" one is labels-only
        for other in ("student_baseline.safetensors", "teacher.safetensors"):
            (member / other).symlink_to(weights / other)
        (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--seeds", str(runs["seed1"]), str(runs["seed1b"]), "--plain-teachers", str(weights),
                             str(runs["seed1"]), str(runs["seed1b"])]) == 0
    out = capsys.readouterr().out
    own = re.search(r"seed 0: .*distilled - labels-only ([+-][0-9.]+)", out).group(1)
    assert own != "+0.0000"
    assert re.search(r"seed 1: student .*distilled - labels-only ([+-][0-9.]+)", out).group(1) == own
    assert re.search(r"seed 1 \(seed1b\): student .*distilled - labels-only ([+-][0-9.]+)", out).group(1) == "+0.0000"
    assert "over seeds 0, 1, 1 (seed1b): distilled - labels-only" in out
    assert "over seeds 0, 1, 1 (seed1b): pretrained teacher - plain teacher +0.0000" in out


def test_kd_transfer_compares_students_from_scratch_with_their_teacher_stem_twins(tiny_run, tmp_path, capsys):
    """--scratch: a run with --student-init scratch; its labels-only student (a student trained with alpha 1 counts
    as one) against the teacher-stem one, and the teacher and the distilled student against it. The run's own
    students under the scratch run's name compare to +0.0000; a run that did not start from scratch is refused."""
    import json

    import kd_transfer

    data, weights = tiny_run
    member = tmp_path / "scratch"
    card = _one_model_run(weights, member, "student_baseline", student_init="scratch", alpha=1.0)
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--scratch", str(member)]) == 0
    out = capsys.readouterr().out
    assert "student_baseline - student_baseline_scratch: +0.0000" in out
    for line in ("teacher - student_baseline_scratch", "student - student_baseline_scratch"):
        assert line in out, line
    assert "student - student_scratch" not in out  # no distilled student from scratch in that run
    card["config"]["alpha"] = 0.5  # now its student is a distilled one: the pair item 3 asks about
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50",
                             "--scratch", str(member)]) == 0
    assert "student - student_scratch" in capsys.readouterr().out
    card["config"]["student_init"] = "teacher-stem"
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(["--weights", str(weights), "--data", str(data), "--splits", "val",
                             "--scratch", str(member)]) == 1
    assert "not a run of this recipe with --student-init scratch" in capsys.readouterr().out


def test_kd_transfer_takes_the_labels_only_student_from_a_run_trained_with_alpha_1(tiny_run, tmp_path, capsys):
    """--labels-only: a run of the same recipe and init trained with alpha 1 stands in for the labels-only student
    (`kd distill` trains none); the weights' own labels-only student under that run's name gives the same
    difference as without it; a run trained with the teacher's term (alpha below 1) is refused."""
    import json
    import re

    import kd_transfer

    data, weights = tiny_run
    args = ["--weights", str(weights), "--data", str(data), "--splits", "val", "--n-boot", "50"]
    assert kd_transfer.main(args) == 0
    own = re.search(r"student - student_baseline: ([+-][0-9.]+)", capsys.readouterr().out).group(1)
    member = tmp_path / "labels-only"
    card = _one_model_run(weights, member, "student_baseline", alpha=1.0)
    assert kd_transfer.main(args + ["--labels-only", str(member)]) == 0
    assert f"student - student_baseline: {own}" in capsys.readouterr().out
    card["config"]["alpha"] = 0.5
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(args + ["--labels-only", str(member)]) == 1
    assert "trained on the labels alone" in capsys.readouterr().out


def test_predict_bulk_bench_times_both_paths(kd_tiny, capsys, monkeypatch):
    import predict_bulk

    monkeypatch.setattr(predict_bulk, "SHARED", Path("/nonexistent"))  # generated files, with or without data
    assert predict_bulk.main(["--files", "5", "--pairs", "1", "--batch-size", "2", "--weights", str(kd_tiny.weights)]) == []
    out = capsys.readouterr().out
    assert "5 files" in out and "one_by_one" in out and "batched" in out and "no verdict" in out
    assert "two_step" in out and "batched / two_step = " in out


def test_diagnose_bench_times_the_two_step_path_beside_ours(capsys, monkeypatch):
    """bench/diagnose.py: ours, the two-step path (kd.serving.diagnose_apart) and the naive one, interleaved; one
    pair gives figures but no ratio verdict. Without the data its picture must pass the refusal check (a clean
    clone's CI found a generated texture refused)."""
    import diagnose

    monkeypatch.setattr(diagnose, "SHARED", Path("/nonexistent"))
    lines = diagnose.main(["--pairs", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "end to end (two-step)" in out and "ours/two-step = " in out and "ours/baseline = " in out
    assert [line.split()[1] for line in lines] == ["diagnose_end_to_end_s"]


def _outside_corpus(root: Path) -> Path:
    """An unlabeled corpus as it comes: grey JPEG and RGB PNG of several sizes and aspects in source folders, and
    a manifest.csv naming each file's source and licence (and a column kd does not read)."""
    from PIL import Image

    from tests.fixtures.xray_fixtures import xray_like_array

    rows = ["file,source_repo,commit,licence"]
    for i, (h, w, source) in enumerate([(300, 256, "a"), (180, 240, "a"), (256, 256, "b"), (90, 60, "b")]):
        picture = Image.fromarray(xray_like_array(h, w, seed=40 + i))
        name = f"{source}/x{i}.{'png' if i % 2 else 'jpeg'}"
        (root / source).mkdir(parents=True, exist_ok=True)
        (picture.convert("RGB") if i % 2 else picture).save(root / name)
        rows.append(f"{name},{source}/repo,abc,CC BY {i % 2 + 3}.0")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_pack_images_shrinks_a_corpus_and_keeps_its_licences(tmp_path, capsys):
    """bench/pack_images.py: every picture a grey JPEG at most --side on its longer side, the aspect kept, small
    pictures not enlarged; a PNG becomes a .jpeg and the manifest follows it, so the model card still finds
    every file's licence (kd.data.unlabeled_provenance on the packed folder)."""
    from PIL import Image

    import pack_images
    from kd.data import list_unlabeled, unlabeled_provenance

    src = _outside_corpus(tmp_path / "src")
    dst = tmp_path / "packed"
    assert pack_images.main([str(src), str(dst), "--side", "64"]) == 0
    assert "4 pictures" in capsys.readouterr().out
    packed = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.jpeg"))
    assert packed == ["a/x0.jpeg", "a/x1.jpeg", "b/x2.jpeg", "b/x3.jpeg"]
    sizes = {name: Image.open(dst / name).size for name in packed}
    assert all(Image.open(dst / name).mode == "L" for name in packed)
    assert sizes["a/x0.jpeg"] == (55, 64) and sizes["a/x1.jpeg"] == (64, 48) and sizes["b/x3.jpeg"] == (43, 64)
    used = [str(p) for p in list_unlabeled([str(dst)])]
    [entry] = unlabeled_provenance([str(dst)], used)
    assert entry["images"] == 4
    assert sorted((s["source"], s["licence"], s["images"]) for s in entry["sources"]) == [
        ("a/repo", "CC BY 3.0", 1), ("a/repo", "CC BY 4.0", 1), ("b/repo", "CC BY 3.0", 1), ("b/repo", "CC BY 4.0", 1)]
    assert pack_images.main([str(src), str(tmp_path / "large"), "--side", "400"]) == 0
    assert Image.open(tmp_path / "large" / "a" / "x0.jpeg").size == (256, 300)  # never enlarged
    assert pack_images.main([str(src), str(src / "inside")]) == 2  # never writes into what it reads


def _run_gpu_ssl(tiny_dataset, tmp_path, **settings) -> tuple[int, str, Path]:
    """bench/gpu_ssl.sh on the CPU at tiny size (one MoCo epoch at 32 px unless `settings` say otherwise): its exit
    status, its log and its WORK folder."""
    import os
    import subprocess

    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "PRESET": "tiny", "DEVICE": "cpu", "PRETRAIN_EPOCHS": "1", "PRETRAIN_SIZE": "32",
           "SEEDS": "0", "DATA": str(tiny_dataset), "CORPUS": str(_outside_corpus(tmp_path / "corpus")),
           "WORK": str(work), "OUT": str(out), "OMP_NUM_THREADS": "1", **settings}
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_ssl.sh"
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    return done.returncode, (out / "gpu_ssl.log").read_text(), work


@pytest.mark.slow
def test_gpu_ssl_comparison_runs_end_to_end_on_the_cpu(tiny_dataset, tmp_path):
    """bench/gpu_ssl.sh at tiny size on the CPU, as a lent GPU would run it at the gpu preset's: the control
    without pretraining, one MoCo pretraining on train/ + the corpus shared by two seeds (copied, not redone),
    every run exported, distillation pooled over the seeds, the results packed for the trip back."""
    import json
    import tarfile

    returncode, log, work = _run_gpu_ssl(tiny_dataset, tmp_path, SEEDS="0 1", DEADLINE="900")
    assert returncode == 0, log[-3000:]
    for run in ("control", "moco-seed0", "moco-seed1"):
        card = json.loads((work / run / "model_card.json").read_text())
        assert set(card["models"]) == {"teacher", "student", "student_baseline"}, run
        assert card["models"]["teacher"]["test"]["auc"] is not None
    pretrain = {run: json.loads((work / run / "pretrain" / "done.json").read_text())
                for run in ("moco-seed0", "moco-seed1")}
    assert pretrain["moco-seed0"] == pretrain["moco-seed1"]  # one pretraining, copied
    assert pretrain["moco-seed0"]["unlabeled_images"] == 4 and pretrain["moco-seed0"]["epochs"] == 1
    configs = {run: json.loads((work / f"{run}.config.json").read_text()) for run in ("control", "moco-seed1")}
    assert configs["moco-seed1"]["ssl_method"] == "moco" and configs["moco-seed1"]["seed"] == 1
    assert configs["control"]["pretrain"]["epochs"] == 0 and configs["control"]["unlabeled"] == []
    assert "pooled" in log and "moco-seed1" in log and "test AUC" in log
    with tarfile.open(tmp_path / "out" / "ssl_runs.tgz") as tar:
        names = set(tar.getnames())
    assert {"control/model_card.json", "moco-seed0/model_card.json", "moco-seed1/model_card.json"} <= names


def test_gpu_ssl_comparison_fails_when_its_runs_fail(tiny_dataset, tmp_path):
    """A run that dies on its own fails the script, naming it, so a lent GPU's call does not come back green with a
    run missing (here the cache folder is a file, which stops the control and the pretraining alike)."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "cache").write_text("not a folder")
    returncode, log, work = _run_gpu_ssl(tiny_dataset, tmp_path)
    assert returncode == 1, log[-3000:]
    assert "FAILED: pretraining control" in log and "control failed (exit status" in log
    assert f"The image cache folder {work / 'cache'} is a file, not a folder" in log


def test_gpu_ssl_comparison_stopped_by_its_deadlines_is_not_a_failure(tiny_dataset, tmp_path):
    """What the deadlines stop (the pretraining at PRETRAIN_DEADLINE, the control at DEADLINE) keeps its last epoch
    for a second call: said so, and the script still exits 0."""
    returncode, log, _ = _run_gpu_ssl(tiny_dataset, tmp_path, PRETRAIN_EPOCHS="50", PRETRAIN_DEADLINE="2",
                                      DEADLINE="4")
    assert returncode == 0, log[-3000:]
    assert "pretraining passed PRETRAIN_DEADLINE (2 s)" in log and "FAILED" not in log and "failed" not in log


def test_kd_transfer_puts_another_runs_teacher_in_the_weights_teachers_place(tiny_run, tmp_path, capsys):
    """--teacher: the teacher of another run of the same input size, contrast and split (another pretraining)
    replaces the weights' teacher in every comparison (here the run's own labels-only student stands in as that
    teacher, so the two compare to exactly +0.0000); a run on another validation split is refused."""
    import json
    import re

    import kd_transfer

    data, weights = tiny_run
    args = ["--weights", str(weights), "--data", str(data), "--splits", "val", "test", "--n-boot", "50"]
    assert kd_transfer.main(args) == 0
    own = re.findall(r"teacher - student_baseline: ([+-][0-9.]+)", capsys.readouterr().out)
    member = tmp_path / "byol"
    card = _one_model_run(weights, member, "student_baseline", as_role="teacher", ssl_method="byol")
    # the run's own teacher differs from its labels-only student on one split at least (24 images each: both can
    # rank one split perfectly)
    assert len(own) == 2 and set(own) != {"+0.0000"}
    assert kd_transfer.main(args + ["--teacher", str(member)]) == 0
    assert re.findall(r"teacher - student_baseline: ([+-][0-9.]+)", capsys.readouterr().out) == ["+0.0000"] * 2
    card["config"]["split_seed"] = 5
    (member / "model_card.json").write_text(json.dumps(card))
    assert kd_transfer.main(args + ["--teacher", str(member)]) == 1
    assert "not one recipe" in capsys.readouterr().out
