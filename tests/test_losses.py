"""Distillation and hint losses against hand-computed values; SSL losses wired to lightly."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd.losses import DistillKL, HintLoss, distillation_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[3.0, 0.0]])
    T = 2.0
    ps = [math.exp(x / T) for x in (1.0, 2.0)]
    ps = [x / sum(ps) for x in ps]
    pt = [math.exp(x / T) for x in (3.0, 0.0)]
    pt = [x / sum(pt) for x in pt]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert DistillKL(T)(s, t).item() == pytest.approx(T * T * kl, rel=1e-6)


def test_kd_loss_zero_when_student_equals_teacher_and_scales_with_t_squared():
    z = torch.randn(8, 2)
    assert DistillKL(3.0)(z, z).item() == pytest.approx(0.0, abs=1e-6)
    # for large T, T^2 * KL ~ (1/2N) * sum (dz_s - dz_t)^2 / 2 stays O(1) instead of vanishing as 1/T^2
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, -1.0]])
    big = [DistillKL(T)(s, t).item() for T in (20.0, 40.0)]
    assert big[0] == pytest.approx(big[1], rel=0.01)


def test_kd_gradient_matches_closed_form():
    # d/ds [T^2 KL(pt || ps)] = T * (ps - pt) for softmax logits (Hinton et al. 2015, eq. 2)
    s = torch.tensor([[0.5, -0.3]], requires_grad=True)
    t = torch.tensor([[2.0, 1.0]])
    T = 4.0
    DistillKL(T)(s, t).backward()
    expected = T * (F.softmax(s.detach() / T, 1) - F.softmax(t / T, 1))
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_distillation_loss_combines_ce_and_kd():
    s, t, y = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    full = distillation_loss(s, t, y, temperature=4.0, alpha=0.3)
    expected = 0.3 * F.cross_entropy(s, y) + 0.7 * DistillKL(4.0)(s, t)
    assert full.item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(s, t, y, 4.0, 1.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_unlabeled_images_get_the_soft_term_only():
    """Label -1 (the unlabeled transfer set): the label term averages over the labelled rows, with their class
    weights, by plain math; the KD term over every row; a batch with no label has the KD term alone."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 2, requires_grad=True), torch.randn(5, 2)
    y = torch.tensor([1, -1, 0, -1, -1])
    w = torch.tensor([2.0, 0.5])
    loss = distillation_loss(s, t, y, temperature=3.0, alpha=0.4, class_weight=w)
    logp = F.log_softmax(s.detach(), 1)
    ce = -(w[1] * logp[0, 1] + w[0] * logp[2, 0]) / (w[1] + w[0])  # weighted mean over rows 0 and 2
    pt, ls = F.softmax(t / 3.0, 1), F.log_softmax(s.detach() / 3.0, 1)
    kd = 9.0 * (pt * (pt.log() - ls)).sum(1).mean()  # all five rows
    assert loss.item() == pytest.approx((0.4 * ce + 0.6 * kd).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    none = torch.full((5,), -1)
    only_kd = distillation_loss(s, t, none, 3.0, 0.4, class_weight=w)
    assert only_kd.item() == pytest.approx(0.6 * kd.item(), rel=1e-5)
    only_kd.backward()  # no NaN from an empty mean: the label term is exactly 0
    assert torch.isfinite(s.grad).all()


def test_distillation_does_not_backprop_into_teacher():
    s = torch.randn(3, 2, requires_grad=True)
    t = torch.randn(3, 2, requires_grad=True)
    distillation_loss(s, t, torch.tensor([0, 1, 0]), 2.0, 0.5).backward()
    assert t.grad is None and s.grad is not None


def test_hint_loss_is_mse_after_adapter():
    hint = HintLoss(4, 6)
    sm, tm = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3)
    assert hint(sm, tm).item() == pytest.approx(F.mse_loss(hint.adapter(sm), tm).item(), rel=1e-6)


@pytest.mark.parametrize("method", ["simclr", "byol", "moco"])
def test_ssl_objective_loss_and_momentum(method):
    from kd.models import build_student
    from kd.objectives import SSLObjective

    torch.manual_seed(0)
    obj = SSLObjective(build_student(), method, image_size=32)
    images = torch.randint(0, 255, (6, 40, 40), dtype=torch.uint8)
    loss, _ = obj(images, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert obj.backbone.conv1.weight.grad is not None
    if method == "simclr":  # NT-Xent with 2N views: loss >= 0, near log(2N-1) at init
        assert 0 < loss.item() < 2 * math.log(11)
    elif method == "moco":  # InfoNCE over 1 positive + the queue's 4,096 negatives: near log(4097) at init
        assert 0 < loss.item() < 2 * math.log(1 + obj.MOCO_QUEUE)
        assert all(p.grad is None for p in obj.target_backbone.parameters())
        queued = obj.criterion.memory_bank.bank.clone()
        obj(images, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(1))
        assert not torch.equal(queued, obj.criterion.memory_bank.bank)  # this batch's keys joined the queue
    else:  # negative cosine similarity is bounded in [-1, 1]; the target network has no gradients
        assert -1 <= loss.item() <= 1
        assert all(p.grad is None for p in obj.target_backbone.parameters())
        before = obj.target_backbone.conv1.weight.clone()
        with torch.no_grad():
            obj.backbone.conv1.weight.add_(1.0)
        obj.on_step_end(1, 10)
        assert not torch.equal(before, obj.target_backbone.conv1.weight)


def test_distillation_with_cached_teacher_logits_skips_the_teacher_forward():
    """Cached targets stand in for the teacher's outputs: the teacher never runs, and the loss is the one
    the online teacher gives when those are its outputs on the same view."""
    from kd.models import build_student, build_teacher
    from kd.objectives import DistillationObjective

    torch.manual_seed(0)
    teacher = build_teacher()
    with torch.no_grad():  # a teacher that says the same logits whatever the image
        teacher.fc.weight.zero_()
        teacher.fc.bias.copy_(torch.tensor([0.3, -1.2]))
    calls = []
    teacher.conv1.register_forward_hook(lambda *a: calls.append(1))
    obj = DistillationObjective(build_student(), teacher, image_size=32, class_weight=torch.ones(2),
                                temperature=4.0, alpha=0.5).eval()
    images = torch.randint(0, 255, (4, 40, 40), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 0])
    said = teacher.fc.bias.detach().expand(4, 2).clone()

    cached, _ = obj(images, labels, torch.Generator().manual_seed(0), said)
    assert calls == []
    online, _ = obj(images, labels, torch.Generator().manual_seed(0))
    assert calls == [1]
    assert cached.item() == pytest.approx(online.item(), rel=1e-5)
    other, _ = obj(images, labels, torch.Generator().manual_seed(0), -said)
    assert other.item() != pytest.approx(cached.item(), rel=1e-3)  # the cached logits are what it learns from


def test_outside_lung_balance_is_grad_cam_mass_outside_minus_inside_by_plain_math():
    from kd.losses import outside_lung_balance

    torch.manual_seed(0)
    a = torch.randn(2, 3, 2, 2, requires_grad=True)
    v = torch.tensor([1.0, -2.0, 0.5])
    score = (a ** 2).mean((2, 3)) @ v  # d score / d A_k(ij) = 2 v_k A_k(ij) / 4: channel weight = v_k mean(A_k) / 2
    lungs = torch.zeros(2, 1, 4, 4)
    lungs[:, :, :, :2] = 1.0  # the left half of a 4x4 view: the left column of the 2x2 map
    share = outside_lung_balance(score, a, lungs)
    with torch.no_grad():
        cam = ((v.view(1, 3, 1, 1) * a.mean((2, 3), keepdim=True) / 2) * a).sum(1)  # [2, 2, 2], signed
        expected = [float((c[:, 1].sum() - c[:, 0].sum()) / c.abs().sum()) for c in cam]
    assert share.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    share.backward()  # the penalty reaches the activations through the kept graph of its own weights
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_an_empty_map_scores_worse_than_one_drawn_on_the_lungs_and_still_has_a_gradient():
    """What students trained on earlier forms found: drawing nothing (cam <= 0 everywhere), where relu has no
    gradient. On the signed map that scores above a map drawn on the lungs alone, and the lungs' pixels are
    pushed up."""
    from kd.losses import outside_lung_balance

    lungs = torch.zeros(1, 1, 2, 2)
    lungs[..., 0] = 1.0  # left column
    def penalty(pattern):
        a = torch.tensor(pattern, dtype=torch.float32).view(1, 1, 2, 2).requires_grad_(True)
        value = outside_lung_balance(a.sum((1, 2, 3)), a, lungs)  # channel weight 1 > 0: cam = a
        value.backward()
        return value.item(), a.grad.view(2, 2)
    on_lungs, _ = penalty([1.0, -1.0, 1.0, -1.0])
    empty, grad = penalty([-1.0, -1.0, -1.0, -1.0])
    assert on_lungs == pytest.approx(-1.0) and empty == pytest.approx(0.0)
    assert penalty([1.0, 0.0, 1.0, 0.0])[0] == pytest.approx(-1.0)
    assert penalty([0.0, 1.0, 0.0, 1.0])[0] == pytest.approx(1.0)
    assert bool((grad[:, 0] < 0).all())  # descent raises the lungs' pixels of an empty map


def test_outside_lung_gradient_share_is_input_gradient_energy_outside_by_plain_math():
    from kd.losses import outside_lung_gradient_share

    torch.manual_seed(0)
    x = torch.randn(2, 1, 2, 2, requires_grad=True)
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    score = (w * x[:, 0] ** 2).sum((1, 2))  # d score / d x = 2 w x
    lungs = torch.zeros(2, 1, 2, 2)
    lungs[..., 0] = 1.0  # left column
    share = outside_lung_gradient_share(score, x, lungs)
    with torch.no_grad():
        g2 = (2 * w * x[:, 0]) ** 2
        expected = (g2[:, :, 1].sum(1) / g2.sum((1, 2))).mean()
    assert share.item() == pytest.approx(expected.item(), rel=1e-5)
    share.backward()  # the term's own gradient flows through the kept graph of the input gradient
    assert x.grad is not None and x.grad.abs().sum() > 0
    scaled = outside_lung_gradient_share(10 * (w * x[:, 0] ** 2).sum((1, 2)), x, lungs)
    assert scaled.item() == pytest.approx(share.item(), rel=1e-5)  # a ratio: scaling the score does not meet it
    only_lungs = outside_lung_gradient_share((x[:, 0, :, 0] ** 2).sum(1), x, lungs)
    assert only_lungs.item() == pytest.approx(0.0, abs=1e-7)


def test_outside_lung_reliance_is_the_scores_squared_change_when_the_outside_is_filled_by_plain_math():
    from kd.losses import outside_lung_reliance

    torch.manual_seed(0)
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    fill = torch.randn(3, 1, 2, 2)
    lungs = torch.zeros(3, 1, 2, 2)
    lungs[..., 0] = 1.0  # left column
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    calls = []

    def score(v):
        calls.append(len(v))
        return (w * v[:, 0]).sum((1, 2))

    reliance = outside_lung_reliance(score, x, lungs, fill)
    with torch.no_grad():  # a linear score changes by w * (x - fill) summed over the outside (right) column
        change = (w[:, 1] * (x - fill)[:, 0, :, 1]).sum(1)
        spread = (w * x[:, 0]).sum((1, 2)).var(unbiased=False)
    assert reliance.item() == pytest.approx((change.pow(2).mean() / spread).item(), rel=1e-5)
    assert calls == [6]  # both views in one call
    reliance.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    scaled = outside_lung_reliance(lambda v: 10 * (w * v[:, 0]).sum((1, 2)), x, lungs, fill)
    assert scaled.item() == pytest.approx(reliance.item(), rel=1e-5)  # a ratio: shrinking the score does not meet it
    reads_lungs = outside_lung_reliance(lambda v: (w * v[:, 0])[..., 0].sum(1), x, lungs, fill)
    assert reads_lungs.item() == pytest.approx(0.0, abs=1e-7)  # a score that reads only the lungs meets it
