"""What each phase optimises. The training loop (kd.train) is the same for all of them.

An objective is an nn.Module: `forward(images_uint8, labels, generator[, teacher_logits])` augments the batch and
returns `(loss, stats)`, so DDP can wrap it whole. `validate` gives the phase's probe metric;
`exports` names the models the phase produces.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.benchmarking import knn_predict
from lightly.utils.scheduler import cosine_schedule
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kd import augment, metrics
from kd.cache import ImageSet
from kd.data import PNEUMONIA
from kd.scoring import predict_logits
from kd.losses import (HintLoss, distillation_loss, outside_lung_balance, outside_lung_gradient_share,
                       outside_lung_reliance)
from kd.models import STAGES, embed, feature_dim, feature_map


@dataclass
class ValContext:
    """What validation needs: the held-out split, the training split (kNN bank), and where to run."""

    val: ImageSet | None
    train: ImageSet
    device: torch.device
    batch_size: int = 64
    knn_k: int = 20
    max_knn_bank: int = 2000


def class_weights(counts) -> torch.Tensor:
    """Inverse-frequency weights (1,341 normal vs 3,875 pneumonia in Kermany train)."""
    counts = torch.as_tensor(np.maximum(np.asarray(counts, dtype=np.float64), 1.0))
    return (counts.sum() / (len(counts) * counts)).float()


def logits_and_stage(model: nn.Module, x: torch.Tensor, stage: str = "layer4") -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and one ResNet stage's output from a single forward pass (what a Grad-CAM of it needs;
    layer4's is what the feature hint matches)."""
    a = feature_map(model, x, stage)
    y = a
    for name in STAGES[STAGES.index(stage) + 1:]:
        y = getattr(model, name)(y)
    return model.fc(torch.flatten(model.avgpool(y), 1)), a


class Objective(nn.Module):
    exports: tuple[str, ...] = ()  # roles of the models the phase produces: "teacher", "student"

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.ema: AveragedModel | None = None

    def use_ema(self, decay: float) -> "Objective":
        """Keep an exponential moving average of the exported model's weights (and BatchNorm statistics);
        the average is what validation sees and what the phase exports (Polyak & Juditsky 1992; the
        usual EMA of modern training recipes). decay 0 = off."""
        if decay > 0:
            (name,) = self.exports
            self.ema = AveragedModel(self.trained(name), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
            self.ema.requires_grad_(False)
        return self

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Hook after each optimiser step (the EMA; BYOL's momentum update)."""
        if self.ema is not None:
            (name,) = self.exports
            self.ema.update_parameters(self.trained(name))

    def trained(self, role: str) -> nn.Module:
        """The module this phase trains for `role` (the attribute of that name, unless a subclass says)."""
        return getattr(self, role)

    def validate(self, ctx: ValContext) -> dict:
        return {}

    def exported(self) -> dict[str, nn.Module]:
        if self.ema is not None:
            (name,) = self.exports
            return {name: self.ema.module}
        return {name: self.trained(name) for name in self.exports}


class SSLObjective(Objective):
    """Self-supervised pretraining of the teacher backbone with lightly's objectives.

    simclr: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (2020).
    byol: Grill et al., "Bootstrap Your Own Latent" (2020), momentum target network.
    moco: Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo v2, 2020): a momentum key
    encoder and a queue of past keys as negatives, so a batch of 64 sees 4,096 negatives (SimCLR sees 126),
    and one backward pass per image instead of two: the method for small batches on a CPU.
    """

    MOCO_QUEUE = 4096

    exports = ("teacher",)  # the backbone becomes the teacher that fine-tuning starts from

    def __init__(self, backbone: nn.Module, method: str, image_size: int, distributed: bool = False):
        super().__init__(image_size)
        self.backbone, self.method = backbone, method  # BYOL's online network; not a distillation teacher
        backbone.fc.requires_grad_(False)  # the head is not part of the SSL loss: DDP needs every trained tensor used
        dim = feature_dim(backbone)
        if method == "simclr":
            self.head = SimCLRProjectionHead(dim, dim, 128)
            self.criterion = NTXentLoss(temperature=0.2, gather_distributed=distributed)
        elif method in ("byol", "moco"):
            if method == "byol":
                self.head = BYOLProjectionHead(dim, 4096, 256)
                self.predictor = BYOLPredictionHead(256, 4096, 256)
                self.criterion = NegativeCosineSimilarity()
            else:
                self.head = MoCoProjectionHead(dim, 2048, 128)
                self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=(self.MOCO_QUEUE, 128),
                                            gather_distributed=distributed)
            self.target_backbone = copy.deepcopy(backbone)
            self.target_head = copy.deepcopy(self.head)
            deactivate_requires_grad(self.target_backbone)
            deactivate_requires_grad(self.target_head)
        else:
            raise ValueError(f"unknown SSL method {method!r}")

    def forward(self, images, labels, generator):
        v1 = augment.SSL(images, self.image_size, generator).contiguous(memory_format=torch.channels_last)
        v2 = augment.SSL(images, self.image_size, generator).contiguous(memory_format=torch.channels_last)
        if self.method == "simclr":
            z = self.head(embed(self.backbone, torch.cat([v1, v2])))
            z1, z2 = z.chunk(2)
            return self.criterion(z1, z2), {}
        if self.method == "moco":  # queries from the trained encoder, keys from the momentum encoder
            q = self.head(embed(self.backbone, v1))
            with torch.no_grad():
                k = self.target_head(embed(self.target_backbone, v2))
            return self.criterion(q, k), {}
        p1, p2 = (self.predictor(self.head(embed(self.backbone, v))) for v in (v1, v2))
        with torch.no_grad():
            t1, t2 = (self.target_head(embed(self.target_backbone, v)) for v in (v1, v2))
        return 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1)), {}

    def trained(self, role: str) -> nn.Module:
        return self.backbone

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # a checkpoint written while the backbone was called `teacher` resumes too
        state_dict = {("backbone" + k[len("teacher"):] if k.startswith("teacher.") else k): v
                      for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict, assign)

    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        if self.method in ("byol", "moco"):
            m = cosine_schedule(step, max(total_steps, 1), 0.99, 1.0)
            update_momentum(self.backbone, self.target_backbone, m)
            update_momentum(self.head, self.target_head, m)

    @torch.no_grad()
    def validate(self, ctx: ValContext) -> dict:
        """kNN accuracy of the embeddings on the validation split (Wu et al. 2018's SSL probe)."""
        if ctx.val is None or len(ctx.val) == 0:
            return {}
        labelled = np.flatnonzero(ctx.train.labels >= 0)
        bank_idx = labelled[np.linspace(0, len(labelled) - 1, min(ctx.max_knn_bank, len(labelled))).astype(int)]
        bank, bank_labels = self._embed(ctx, ctx.train, bank_idx)
        feats, val_labels = self._embed(ctx, ctx.val, np.arange(len(ctx.val)))
        pred = knn_predict(feats, bank.t().contiguous(), bank_labels, num_classes=2,
                           knn_k=min(ctx.knn_k, len(bank_idx)), knn_t=0.1)[:, 0]
        correct = (pred == val_labels).float()
        recalls = [correct[val_labels == c].mean().item() for c in (0, 1) if (val_labels == c).any()]
        return {"knn_accuracy": correct.mean().item(), "knn_balanced_accuracy": float(np.mean(recalls))}

    def _embed(self, ctx: ValContext, images: ImageSet, index: np.ndarray):
        was_training = self.training
        self.eval()
        feats, labels = [], []
        for start in range(0, len(index), ctx.batch_size):
            x, y, *_ = images.batch(index[start:start + ctx.batch_size], ctx.device)
            x = augment.center(x, self.image_size).contiguous(memory_format=torch.channels_last)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda"):
                feats.append(F.normalize(embed(self.backbone, x).float(), dim=1))
            labels.append(y)
        self.train(was_training)
        return torch.cat(feats), torch.cat(labels).to(ctx.device)


def _supervised_validate(model: nn.Module, image_size: int, ctx: ValContext) -> dict:
    if ctx.val is None or len(ctx.val) == 0:
        return {}
    p = metrics.softmax_pneumonia(predict_logits(model, ctx.val, image_size, ctx.device, ctx.batch_size))
    m = metrics.binary_metrics(ctx.val.labels, p, 0.5)
    return {k: m[k] for k in ("auc", "accuracy", "sensitivity", "specificity")}


class SupervisedObjective(Objective):
    """Weighted cross-entropy on labels: fine-tuning the teacher, or the labels-only student baseline."""

    def __init__(self, model: nn.Module, role: str, image_size: int, class_weight: torch.Tensor,
                 augmentation: augment.Augment = augment.SUPERVISED, label_smoothing: float = 0.0,
                 head_only: bool = False):
        super().__init__(image_size)
        setattr(self, role, model)
        self.role = role
        self.exports = (role,)
        self.augmentation, self.label_smoothing = augmentation, label_smoothing
        self.head_only = head_only  # a linear probe: the features (and their BatchNorm statistics) stay as they are
        for name, p in model.named_parameters():
            p.requires_grad_(not head_only or name.startswith("fc."))
        self.register_buffer("class_weight", class_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.head_only:
            self.model.eval()  # BatchNorm keeps the pretrained statistics; the linear head has none to move
        return self

    @property
    def model(self) -> nn.Module:
        return getattr(self, self.role)

    def forward(self, images, labels, generator):
        x = self.augmentation(images, self.image_size, generator).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(self.model(x), labels, weight=self.class_weight, label_smoothing=self.label_smoothing)
        return loss, {}

    def validate(self, ctx: ValContext) -> dict:
        return _supervised_validate(self.exported()[self.role], self.image_size, ctx)


class DistillationObjective(Objective):
    """Student trained on labels and on the frozen teacher's softened outputs (kd.losses.distill).

    By default both see the same augmented view (Beyer et al. 2022: a consistent, patient teacher).
    When the batch carries cached teacher logits (`teacher_targets="cached"`, see `cache_teacher_logits`),
    those are used instead and the teacher's forward pass is skipped: cheaper, but the targets no
    longer match the view the student sees (bench/teacher_cache.py measures both)."""

    exports = ("student",)

    def __init__(self, student: nn.Module, teacher: nn.Module, image_size: int, class_weight: torch.Tensor,
                 temperature: float, alpha: float, hint_weight: float = 0.0,
                 augmentation: augment.Augment = augment.SUPERVISED, label_smoothing: float = 0.0,
                 lung_cam_weight: float = 0.0, lung_cam_stage: str = "layer2", lung_gradient_weight: float = 0.0,
                 outside_reliance_weight: float = 0.0, outside_reliance_fill: str = "blur"):
        super().__init__(image_size)
        self.student, self.teacher = student, teacher
        self.lung_cam_weight, self.lung_cam_stage = lung_cam_weight, lung_cam_stage
        self.lung_gradient_weight, self.outside_reliance_weight = lung_gradient_weight, outside_reliance_weight
        self.outside_reliance_fill = outside_reliance_fill
        self.augmentation, self.label_smoothing = augmentation, label_smoothing
        deactivate_requires_grad(self.teacher)
        self.temperature, self.alpha, self.hint_weight = temperature, alpha, hint_weight
        self.hint = HintLoss(feature_dim(student), feature_dim(teacher)) if hint_weight > 0 else None
        self.register_buffer("class_weight", class_weight)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics must not drift
        return self

    def forward(self, images, labels, generator, teacher_logits=None):
        lungs = None
        if self.lung_cam_weight or self.lung_gradient_weight or self.outside_reliance_weight:
            x, lungs = self.augmentation(images, self.image_size, generator, lungs=True)
        else:
            x = self.augmentation(images, self.image_size, generator)
        x = x.contiguous(memory_format=torch.channels_last)
        t_map = None
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits, t_map = logits_and_stage(self.teacher, x)
        stats, penalty = {}, 0.0
        if self.lung_cam_weight:
            balance = self.lung_cam_balance(x, lungs)
            stats["lung_cam_balance"] = balance.detach()
            penalty = penalty + self.lung_cam_weight * balance
        if self.lung_gradient_weight:
            share = self.lung_gradient_share(x, lungs)
            stats["lung_gradient_share"] = share.detach()
            penalty = penalty + self.lung_gradient_weight * share
        if self.outside_reliance_weight:
            reliance = self.outside_reliance(x, lungs)
            stats["outside_reliance"] = reliance.detach()
            penalty = penalty + self.outside_reliance_weight * reliance
        s_logits, s_map = logits_and_stage(self.student, x)
        loss = distillation_loss(s_logits, teacher_logits.float(), labels, self.temperature, self.alpha,
                                 self.class_weight, self.label_smoothing)
        loss = loss + penalty
        if self.hint is not None and t_map is not None:
            hint = self.hint(s_map, t_map)
            loss = loss + self.hint_weight * hint
            stats["hint"] = hint.detach()
        return loss, stats

    def lung_cam_balance(self, x: torch.Tensor, lungs: torch.Tensor) -> torch.Tensor:
        """kd.losses.lung_cam of the map the app draws (Grad-CAM of the PNEUMONIA logit on lung_cam_stage),
        from the student as the app runs it: BatchNorm on its running statistics, in a pass of its own that
        neither uses nor updates the batch's. Measured with the batch's statistics, the penalty was met by them
        alone (share outside 0.000 in training mode, 0.72 in evaluation mode on the same training images)."""
        with _as_served(self.student):
            s_logits, s_stage = logits_and_stage(self.student, x, self.lung_cam_stage)
            return outside_lung_balance(s_logits[:, PNEUMONIA], s_stage, lungs)

    def lung_gradient_share(self, x: torch.Tensor, lungs: torch.Tensor) -> torch.Tensor:
        """kd.losses.lung_gradient of the served score (the PNEUMONIA logit margin, of which the probability is a
        monotone function), from the student as the app runs it, as lung_cam_balance."""
        with _as_served(self.student):
            x = x.detach().requires_grad_(True)
            logits = self.student(x)
            return outside_lung_gradient_share(pneumonia_margin(logits), x, lungs)

    def outside_reliance(self, x: torch.Tensor, lungs: torch.Tensor) -> torch.Tensor:
        """kd.losses.outside_reliance of the served score (the PNEUMONIA logit margin), from the student as the app
        runs it, as lung_cam_balance; the outside is replaced by occlusion's own fill (kd.cam.Occlusion.fill: the
        picture blurred with a sigma of one patch) or, with the "mean" fill, by each image's mean, which keeps nothing
        of it."""
        if self.outside_reliance_fill == "mean":
            fill = x.mean((1, 2, 3), keepdim=True).expand_as(x)
        else:
            from kd.cam import Occlusion  # pytorch_grad_cam is loaded only when this lever is on

            fill = Occlusion.fill(x, Occlusion.patch_side(x.shape[-1], Occlusion.patch_fraction))
        with _as_served(self.student):
            return outside_lung_reliance(
                lambda v: pneumonia_margin(self.student(v.contiguous(memory_format=torch.channels_last))),
                x, lungs, fill)

    def validate(self, ctx: ValContext) -> dict:
        return _supervised_validate(self.exported()["student"], self.image_size, ctx)


def pneumonia_margin(logits: torch.Tensor) -> torch.Tensor:
    """The PNEUMONIA logit less the other one, [B]: the served score, of which the probability is a monotone
    function."""
    return logits[:, PNEUMONIA] - logits[:, 1 - PNEUMONIA]


@contextlib.contextmanager
def _as_served(model: nn.Module):
    """The model in evaluation mode (BatchNorm on its running statistics) for the block, then back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def cache_teacher_logits(teachers: nn.Module | Sequence[nn.Module], images: ImageSet, image_size: int,
                         device: torch.device, batch_size: int = 64, views=None) -> ImageSet:
    """The same images carrying the frozen teacher's logits on their un-augmented view, computed once; for
    several teachers (an ensemble, Config.extra_teachers) the mean of their logits; with `views`
    (kd.augment.TTA_VIEWS) each teacher's mean over those fixed views."""
    members = [teachers] if isinstance(teachers, nn.Module) else list(teachers)
    logits = np.zeros((len(images), 2), dtype=np.float64)
    for teacher in members:
        teacher = teacher.to(device).to(memory_format=torch.channels_last)  # the fast layout for CPU convolutions
        logits += predict_logits(teacher, images, image_size, device, batch_size, views=views)
    return dataclasses.replace(images, teacher_logits=(logits / len(members)).astype(np.float32))
