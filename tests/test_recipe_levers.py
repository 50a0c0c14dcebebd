"""The recipe levers of bench/recipes.py: each behaves as its docstring says, on small synthetic data."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd import metrics, preprocess
from kd.augment import Augment, gaussian_blur
from kd.config import AugmentConfig, Config, preset
from kd.losses import distillation_loss
from kd.models import build_student
from kd.objectives import SupervisedObjective, class_weights
from kd.export import calibration_halves, choose_operating_point
from tests.fixtures.xray_fixtures import jpeg_bytes, xray_like_array


def _batch(n=6, size=48, seed=0):
    return torch.from_numpy(np.stack([xray_like_array(size, size, seed=seed + i) for i in range(n)]))


def test_contrast_normalisation_spreads_a_dim_xray_over_the_grey_levels():
    dim = (xray_like_array(96, 96, seed=1).astype(np.float32) * 0.3 + 20).astype(np.uint8)  # under-exposed
    for method, spread in (("equalize", 2.0), ("clahe", 1.3)):  # CLAHE limits its contrast gain by design
        out = preprocess.apply_contrast(dim, method)
        assert out.dtype == np.uint8 and out.shape == dim.shape
        assert out.std() > spread * dim.std()
        assert np.corrcoef(out.ravel(), dim.ravel())[0, 1] > 0.8  # the same picture, not another one
    assert preprocess.apply_contrast(dim, "none") is dim
    with pytest.raises(ValueError, match="Unknown contrast"):
        preprocess.apply_contrast(dim, "sharpen")


def test_contrast_is_the_same_in_the_training_cache_and_for_an_upload(tmp_path):
    from kd.cache import build_cache

    path = tmp_path / "a.jpeg"
    path.write_bytes(jpeg_bytes(xray_like_array(300, 260, seed=3)))
    cached = build_cache([str(path)], 64, tmp_path / "cache", progress=False, contrast="clahe").images[0]
    upload, _ = preprocess.prepare(path.read_bytes(), 64, "a.jpeg", "clahe")
    np.testing.assert_array_equal(cached, upload)
    plain = build_cache([str(path)], 64, tmp_path / "cache", progress=False).images[0]
    assert not np.array_equal(cached, plain)  # a separate cache entry, not the same pixels


def test_augment_levers_off_by_default_and_each_changes_the_view():
    x, g = _batch(), lambda: torch.Generator().manual_seed(0)
    base = Augment()(x, 40, g())
    assert torch.equal(base, Augment.from_config(AugmentConfig())(x, 40, g()))
    for lever in (dict(aspect=0.3), dict(gamma=0.4), dict(blur=1.5), dict(noise=0.05), dict(scale=(1.2, 1.3))):
        out = Augment(**lever)(x, 40, g())
        assert out.shape == base.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, base), lever


def test_zoom_out_shows_the_whole_xray_inside_a_black_border():
    x = torch.full((2, 40, 40), 200, dtype=torch.uint8)
    out = Augment(scale=(1.44, 1.44), rotation=0, translate=0, brightness=0, contrast_jitter=0)(x, 40, torch.Generator())
    pixels = out * preprocess.STD + preprocess.MEAN
    black = (pixels < 0.05).float().mean(dim=(1, 2, 3))  # the frame around the shrunken X-ray
    assert torch.all((black > 0.2) & (black < 0.4))  # 1 - 1/1.44 of the area, wherever the X-ray was placed
    assert pixels[:, :, 20, 20].min() > 0.7


def test_gaussian_blur_keeps_the_mean_and_lowers_the_variance_per_image():
    x = torch.rand(3, 1, 32, 32)
    y = gaussian_blur(x, torch.tensor([0.0, 1.0, 2.0]), 2.0)
    assert torch.allclose(y[0], x[0], atol=1e-3)  # sigma 0: unchanged
    assert y[1].var() < x[1].var() and y[2].var() < y[1].var()
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02)


def test_label_smoothing_is_the_textbook_mixture_in_both_losses():
    logits, labels = torch.randn(8, 2), torch.randint(0, 2, (8,))
    eps = 0.1
    target = F.one_hot(labels, 2).float() * (1 - eps) + eps / 2
    expected = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(distillation_loss(logits, logits, labels, 4.0, 1.0, None, eps), expected, atol=1e-6)
    obj = SupervisedObjective(build_student(), "student", 32, class_weights([1, 1]), label_smoothing=eps)
    assert obj.label_smoothing == eps


def test_ema_is_what_is_exported_and_lags_the_trained_weights():
    obj = SupervisedObjective(build_student(), "student", 32, class_weights([1, 1])).use_ema(0.9)
    exported = obj.exported()["student"]
    assert exported is not obj.student and not any(p.requires_grad for p in exported.parameters())
    obj.on_step_end(1, 10)  # the first update starts the average at the current weights
    with torch.no_grad():
        obj.student.fc.weight.add_(1.0)
    before = exported.fc.weight.clone()
    obj.on_step_end(2, 10)
    moved = exported.fc.weight - before
    assert torch.allclose(moved, 0.1 * (obj.student.fc.weight - before), atol=1e-5)  # (1 - decay) of the gap
    assert SupervisedObjective(build_student(), "student", 32, class_weights([1, 1])).use_ema(0).ema is None


def _val(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logits = np.stack([np.zeros(n), (2 * y - 1) * 3.0 + rng.normal(0, 2.0, n)], 1)
    return y, logits, [f"p{i // 2}" for i in range(n)]


def test_calibration_and_threshold_come_from_disjoint_patient_halves():
    _, _, patients = _val()
    fit, pick = calibration_halves(patients, 0)
    assert len(fit) + len(pick) == len(patients) and abs(len(fit) - len(pick)) < 0.2 * len(patients)
    assert not {patients[i] for i in fit} & {patients[i] for i in pick}


@pytest.mark.parametrize("rule", ["youden", "sensitivity", "calibrated-0.5"])
def test_threshold_rules(rule):
    y, logits, patients = _val()
    cfg = preset("tiny")
    cfg.threshold_rule, cfg.min_sensitivity = rule, 0.95
    point = choose_operating_point(cfg, y, logits, patients)
    _, pick = calibration_halves(patients, cfg.seed)
    p = metrics.softmax_pneumonia(logits[pick], point["calibration_temperature"])
    if rule == "calibrated-0.5":
        assert point["threshold"] == 0.5
    elif rule == "sensitivity":
        assert metrics.binary_metrics(y[pick], p, point["threshold"])["sensitivity"] >= 0.95
    else:
        j = lambda t: sum(metrics.binary_metrics(y[pick], p, t)[k] for k in ("sensitivity", "specificity"))  # noqa
        assert j(point["threshold"]) >= max(j(t) for t in np.linspace(0.01, 0.99, 99)) - 1e-9
    fit, _ = calibration_halves(patients, cfg.seed)
    nll = lambda t: -np.mean(np.log(np.where(y[fit] == 1, *(lambda q: (q, 1 - q))(  # noqa: E731
        metrics.softmax_pneumonia(logits[fit], t)))))
    assert nll(point["calibration_temperature"]) <= min(nll(0.5), nll(1.0), nll(2.0)) + 1e-9  # fitted: lowest NLL


def test_config_refuses_unknown_levers():
    for bad in (dict(contrast="sharpen"), dict(threshold_rule="f1"), dict(label_smoothing=0.6),
                dict(ema_decay=1.0), dict(augment=AugmentConfig(scale_min=0.9, scale_max=0.5)),
                dict(augment=AugmentConfig(noise=-1)), dict(bootstrap=5)):
        cfg = Config(**bad)
        with pytest.raises(ValueError):
            cfg.validate()


def test_outside_lungs_blurs_only_outside_the_lung_fields():
    from kd.augment import blur_outside_lungs
    from kd.lungs import lung_mask

    x = _batch(n=3, size=128, seed=4)
    plain = x.unsqueeze(1).float() / 255
    out = blur_outside_lungs(x, plain, torch.tensor([True, False, True]))
    assert torch.equal(out[1], plain[1])  # not chosen: untouched
    changed = (out[0, 0] - plain[0, 0]).abs()
    lungs = torch.from_numpy(lung_mask(x[0].numpy()))
    core = F.max_pool2d((~lungs).float()[None, None], 9, 1, 4)[0, 0] == 0  # lung pixels 4 px from the mask's edge
    outside = F.max_pool2d(lungs.float()[None, None], 9, 1, 4)[0, 0] == 0
    assert changed[core].max() < 0.02  # inside the lungs the detail stays
    assert changed[outside].mean() > 5 * max(changed[core].mean(), 1e-4)  # outside it is blurred away
    # in the augmentation: off draws nothing (the views of every other recipe stay bit-identical), on changes them
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(Augment()(x, 64, g()), Augment(outside_lungs=0.0)(x, 64, g()))
    assert not torch.equal(Augment()(x, 64, g()), Augment(outside_lungs=1.0)(x, 64, g()))
    with pytest.raises(ValueError, match="outside_lungs"):
        preset("tiny", augment=AugmentConfig(outside_lungs=1.5))


def test_linear_probe_trains_the_head_alone_then_fine_tuning_trains_every_layer(tmp_path):
    """LP-FT (Config.probe_epochs): the probe's state holds the initial backbone bit for bit (its BatchNorm
    statistics too) and a new head; the fine-tuned teacher starts from that head and moves the backbone;
    the probe's epochs are logged under their own name and kept in the finetune record."""
    import json

    from kd.checkpoint import load_state
    from kd.models import build_teacher
    from kd.pipeline import run
    from kd.train import phase_seed
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    data = write_kermany_dataset(tmp_path / "data", n_per_class=(8, 8), size=40)
    out = tmp_path / "run"
    cfg = preset("tiny", data=str(data), out=str(out), device="cpu", probe_epochs=2, probe_lr=0.05)
    run(cfg, phases=("finetune",), progress=False)
    torch.manual_seed(phase_seed(cfg.seed, "finetune", "init"))
    initial = build_teacher().state_dict()
    probed = {k[len("teacher."):]: v for k, v in load_state(out / "finetune" / "probe" / "state.pt")["objective"].items()
              if k.startswith("teacher.")}
    body = [k for k in initial if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(probed[k], initial[k]) for k in body)  # weights and running statistics untouched
    assert not torch.equal(probed["fc.weight"], initial["fc.weight"])
    from safetensors.torch import load_file
    tuned = load_file(out / "finetune" / "teacher.safetensors")
    assert not torch.equal(tuned["layer1.0.conv1.weight"].float(), initial["layer1.0.conv1.weight"].float())
    done = json.loads((out / "finetune" / "done.json").read_text())
    assert done["probe"]["epochs"] == 2 and len(done["probe"]["history"]) == 2 and done["probe"]["lr"] == 0.05
    events = [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["kind"] == "epoch" and e["phase"] == "probe"] == [1, 2]
    with pytest.raises(ValueError, match="linear probe"):
        preset("tiny", probe_epochs=-1)


def test_the_progress_bar_shows_the_probe_as_the_start_of_fine_tuning(tmp_path):
    import json

    from kd.ui.run_views import run_view

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({
        "state": "running", "phases": ["pretrain", "finetune", "distill", "baseline"], "phase": "probe",
        "last_event": "step", "epoch": 1, "epochs": 2, "step": 3, "steps": 4, "global_step": 7, "total_steps": 8,
        "time": 0.0, "pid": 0}))
    view = run_view(run_dir)
    assert view.progress_text.startswith("finetune (2/4) · linear probe · epoch 1/2 · step 3/4")
    assert view.fraction == pytest.approx(0.25)


def test_the_lung_view_moves_with_the_augmented_view_and_leaves_it_unchanged():
    from kd.augment import lung_masks

    x = _batch(n=3, size=128, seed=5)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    aug = Augment.from_config(AugmentConfig(scale_min=0.5, scale_max=1.1, aspect=0.15, rotation=10.0))
    plain = aug(x, 64, g())
    view, lungs = aug(x, 64, g(), lungs=True)
    assert torch.equal(plain, view) and lungs.shape == (3, 1, 64, 64)
    still = Augment(scale=(1.0, 1.0), rotation=0.0, translate=0.0, brightness=0.0, contrast_jitter=0.0)
    _, same = still(x, 128, g(), lungs=True)  # no crop, turn or shift: the image's own lung fields
    assert torch.allclose(same, lungs_full := lung_masks(x), atol=1e-5) and lungs_full.sum() > 0
    assert not torch.allclose(lungs, F.interpolate(lungs_full, size=64, mode="area"), atol=0.05)  # moved


def _one_penalised_distillation_step(penalty, stat, weight, by_hand, **settings):
    """One distillation step of a fresh student with the heat-map penalty `penalty` (a DistillationObjective
    keyword) at `weight`; `by_hand(served, view, lungs)` computes that penalty by hand on the student as the app
    serves it (a copy in evaluation mode) for the step's own augmented view; `settings`: more keywords. Checks that
    the step logs the penalty as `stat` at its by-hand value, adds it to the loss with its weight, trains the
    student and gives it back in training mode; returns the logged value."""
    from kd.models import build_teacher
    from kd.objectives import DistillationObjective

    x = _batch(n=4, size=64, seed=6)
    labels = torch.tensor([0, 1, 0, 1])
    teacher_logits = torch.randn(4, 2)
    torch.manual_seed(0)
    student, teacher = build_student(), build_teacher()
    make = lambda w: DistillationObjective(student, teacher, 64, class_weights([1, 1]), 4.0, 0.5,  # noqa: E731
                                           **{penalty: w}, **settings).train()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    before = copy.deepcopy(student)
    view, lungs = make(0.0).augmentation(x, 64, g(), lungs=True)
    expected = by_hand(copy.deepcopy(before).eval(), view, lungs)
    loss, stats = make(weight)(x, labels, g(), teacher_logits)
    assert student.training  # the evaluation-mode pass gives the student back in training mode
    student.zero_grad()
    loss.backward()
    assert student.conv1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        student.load_state_dict(before.state_dict())  # the running statistics as they were before that step
        plain, _ = make(0.0)(x, labels, g(), teacher_logits)
    assert stats[stat].item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() == pytest.approx(plain.item() + weight * expected.item(), rel=1e-4)
    return stats[stat]


def test_the_lung_cam_penalty_joins_the_distillation_loss_and_trains_the_student():
    from kd.losses import outside_lung_balance
    from kd.objectives import logits_and_stage

    def by_hand(served, view, lungs):
        logits, stage = logits_and_stage(served, view, "layer2")  # as the app runs it
        return outside_lung_balance(logits[:, 1], stage, lungs)

    assert -1 < _one_penalised_distillation_step("lung_cam_weight", "lung_cam_balance", 2.0, by_hand) < 1
    with pytest.raises(ValueError, match="lung heat-map"):
        preset("tiny", lung_cam_weight=-1.0)
    with pytest.raises(ValueError, match="not combined"):
        preset("tiny", lung_cam_weight=1.0, hint_weight=1.0, teacher_targets="online")


def test_a_run_with_the_lung_cam_penalty_logs_the_share_outside_the_lungs(tmp_path):
    import json

    steps = _penalised_run_steps(tmp_path, lung_cam_weight=1.0)
    shares = [e["lung_cam_balance"] for e in steps if e["phase"] == "distill"]
    assert shares and all(-1 <= s <= 1 for s in shares)
    assert not any("lung_cam_balance" in e for e in steps if e["phase"] == "finetune")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lung_cam_weight"] == 1.0


def _penalised_run_steps(tmp_path, **penalty) -> list[dict]:
    """The step events of a tiny fine-tuning and distillation run with one of the lung penalties on."""
    import json

    from kd.pipeline import run
    from tests.fixtures.xray_fixtures import write_kermany_dataset

    data = write_kermany_dataset(tmp_path / "data", n_per_class=(8, 8), size=40)
    out = tmp_path / "run"
    run(preset("tiny", data=str(data), out=str(out), device="cpu", teacher_targets="cached", **penalty),
        phases=("finetune", "distill"), progress=False)
    return [json.loads(x) for x in (out / "progress.jsonl").read_text().splitlines() if '"step"' in x]


def test_the_lung_gradient_penalty_joins_the_distillation_loss_on_the_served_student(tmp_path):
    """Config.lung_gradient_weight: the share of the student's input-gradient energy outside the lungs, measured
    in evaluation mode (as the app runs it), is added to the loss with its weight and trains the student; a
    run logs it per step; a negative weight or the hint beside it is refused."""
    from kd.losses import outside_lung_gradient_share

    def by_hand(served, view, lungs):
        v = view.detach().requires_grad_(True)
        z = served(v)
        return outside_lung_gradient_share(z[:, 1] - z[:, 0], v, lungs)

    assert 0 < _one_penalised_distillation_step("lung_gradient_weight", "lung_gradient_share", 3.0, by_hand) < 1
    with pytest.raises(ValueError, match="input-gradient"):
        preset("tiny", lung_gradient_weight=-1.0)
    with pytest.raises(ValueError, match="not combined"):
        preset("tiny", lung_gradient_weight=1.0, hint_weight=1.0, teacher_targets="online")

    steps = _penalised_run_steps(tmp_path, lung_gradient_weight=1.0)
    shares = [e["lung_gradient_share"] for e in steps if e["phase"] == "distill"]
    assert shares and all(0 <= s <= 1 for s in shares)
    assert not any("lung_cam_balance" in e for e in steps)


def test_the_outside_reliance_penalty_joins_the_distillation_loss_on_the_served_student(tmp_path):
    """Config.outside_reliance_weight: the served student's squared change of the PNEUMONIA margin when the view's
    outside-the-lungs pixels are replaced by occlusion's blurred fill is added to the loss with its weight and
    trains the student; a run logs it per step; a negative weight or the hint beside it is refused."""
    from kd.cam import Occlusion
    from kd.losses import outside_lung_reliance

    def by_hand(served, view, lungs):
        fill = Occlusion.fill(view, Occlusion.patch_side(view.shape[-1], Occlusion.patch_fraction))
        return outside_lung_reliance(lambda v: served(v)[:, 1] - served(v)[:, 0], view, lungs, fill)

    assert _one_penalised_distillation_step("outside_reliance_weight", "outside_reliance", 2.0, by_hand) > 0
    with pytest.raises(ValueError, match="outside-the-lungs"):
        preset("tiny", outside_reliance_weight=-1.0)
    with pytest.raises(ValueError, match="not combined"):
        preset("tiny", outside_reliance_weight=1.0, hint_weight=1.0, teacher_targets="online")

    steps = _penalised_run_steps(tmp_path, outside_reliance_weight=1.0)
    reliances = [e["outside_reliance"] for e in steps if e["phase"] == "distill"]
    assert reliances and all(r >= 0 for r in reliances)
    assert not any("outside_reliance" in e for e in steps if e["phase"] == "finetune")


def test_the_outside_reliance_penalty_can_fill_the_outside_with_the_images_mean():
    """outside_reliance_fill="mean": the outside shows each view's mean, so nothing of it stays (the blur keeps its
    coarse brightness); the penalty is computed with that fill; an unknown fill is refused."""
    from kd.losses import outside_lung_reliance

    def by_hand(served, view, lungs):
        fill = view.mean((1, 2, 3), keepdim=True).expand_as(view)
        return outside_lung_reliance(lambda v: served(v)[:, 1] - served(v)[:, 0], view, lungs, fill)

    _one_penalised_distillation_step("outside_reliance_weight", "outside_reliance", 2.0, by_hand,
                                     outside_reliance_fill="mean")
    with pytest.raises(ValueError, match="fill must be one of blur, mean"):
        preset("tiny", outside_reliance_weight=1.0, outside_reliance_fill="zeros")


def test_test_time_views_are_fixed_crops_and_shifts_of_the_whole_image():
    """kd.augment.fixed_view: (1, 0, 0) is the whole image; a shift of dx moves the content by dx of the width the
    other way (the view looks further right); a closer view magnifies about the centre."""
    from kd.augment import TTA_VIEWS, center, fixed_view

    img = torch.zeros(1, 160, 160, dtype=torch.uint8)
    img[:, :, 78:82] = 255  # a bright vertical band at the centre
    assert torch.equal(fixed_view(img, 160, 1.0, 0.0, 0.0), center(img, 160))

    def band(x: torch.Tensor) -> float:  # the band's centre column
        profile = x[0, 0].mean(0)
        profile = profile - profile.min()
        return float((profile * torch.arange(160)).sum() / profile.sum())

    middle = band(center(img, 160))
    assert band(fixed_view(img, 160, 1.0, 0.05, 0.0)) == pytest.approx(middle - 8, abs=0.25)
    assert band(fixed_view(img, 160, 1.0, -0.05, 0.0)) == pytest.approx(middle + 8, abs=0.25)
    wide = torch.zeros(1, 160, 160, dtype=torch.uint8)
    wide[:, :, 40:120] = 255  # 80 px wide; at 0.64 of the area (side 0.8) it fills 100 px
    closer = fixed_view(wide, 160, 0.64, 0.0, 0.0)[0, 0, 80]
    assert int((closer > closer.min() + 0.5 * (closer.max() - closer.min())).sum()) == pytest.approx(100, abs=2)
    assert fixed_view(img, 128, *TTA_VIEWS[2]).shape == (1, 1, 128, 128)  # any input size to the model's


def test_scoring_with_views_is_the_mean_logit_over_them():
    from kd.augment import fixed_view
    from kd.cache import ImageSet
    from kd.scoring import predict_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    pixels = np.stack([xray_like_array(96, 96, seed=s) for s in range(3)])
    images = ImageSet(images=pixels, labels=np.array([0, 1, 1]), rows=np.arange(3))
    views = ((1.0, 0.0, 0.0), (0.8, 0.03, -0.02))
    got = predict_logits(model, images, 64, torch.device("cpu"), views=views)
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        expected = torch.stack([model(fixed_view(x, 64, *v)) for v in views]).mean(0).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, predict_logits(model, images, 64, torch.device("cpu")))
