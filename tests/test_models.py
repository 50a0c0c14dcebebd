"""Architectures, initialisation from a user's weights file, and the teacher-to-student stem copy."""
import torch
import torchvision

from kd.checkpoint import save_weights
from kd.models import build_student, build_teacher, count_parameters, embed, init_from_file, \
    seed_student_from_teacher


def test_architectures_take_one_channel_and_give_two_logits():
    t, s = build_teacher(), build_student()
    x = torch.randn(2, 1, 64, 64)
    assert t(x).shape == s(x).shape == (2, 2)
    assert embed(t, x).shape == (2, 2048) and embed(s, x).shape == (2, 512)
    assert count_parameters(t) > 2 * count_parameters(s)


def test_init_from_rgb_imagenet_style_file_sums_the_stem(tmp_path):
    rgb = torchvision.models.resnet50(weights=None)  # 3-channel, 1000 classes: like an ImageNet checkpoint
    torch.save({"state_dict": {f"module.{k}": v for k, v in rgb.state_dict().items()}}, tmp_path / "in1k.pth")
    teacher = build_teacher()
    loaded = init_from_file(teacher, str(tmp_path / "in1k.pth"))
    assert "conv1.weight" in loaded and "fc.weight" not in loaded  # head shape differs: skipped
    assert torch.allclose(teacher.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    gray = torch.rand(1, 1, 32, 32)
    assert torch.allclose(teacher.conv1(gray), rgb.conv1(gray.expand(1, 3, 32, 32)), atol=1e-5)
    save_weights(teacher, tmp_path / "t.safetensors")
    other = build_teacher()
    assert len(init_from_file(other, str(tmp_path / "t.safetensors"))) == len(teacher.state_dict())


def test_student_stem_is_copied_from_teacher():
    t, s = build_teacher(), build_student()
    copied = seed_student_from_teacher(s, t)
    assert set(copied) >= {"conv1.weight", "bn1.weight", "bn1.bias"}
    assert all(k.startswith(("conv1.", "bn1.")) for k in copied)
    assert torch.equal(s.conv1.weight, t.conv1.weight)
