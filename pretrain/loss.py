"""DINO self-distillation loss with centering and sharpening (paper Eq. 1-4).

With student logits S ((2 + n_local) * B, K, crop-major) and teacher logits
T (2 * B, K, the two global crops):

    p_v = softmax(S_v / tau_s)                 per student crop v
    q_i = softmax((T_i - c) / tau_t(epoch))    per teacher crop i, no gradient
    L   = 1 / |P| * sum_{(i, v) in P} mean_b( - sum_k q_i[b, k] log p_v[b, k] )

where P pairs every teacher global crop i with every student crop v != i
(18 pairs with 8 local crops). After the loss, the center moves towards the
mean raw teacher logit of the batch (over all processes):

    c <- m c + (1 - m) mean_{b, i} T_i[b]      (m = 0.9)

Collapse monitors (the paper's collapse study, Fig. 7), on request: the
mean entropy of the teacher's targets and the mean KL from teacher to
student over the same pairs,

    H(q)       = mean_{i, b} ( - sum_k q_i[b, k] log q_i[b, k] )      in [0, ln K]
    KL(q || p) = mean_{(i, v) in P} mean_b sum_k q_i log(q_i / p_v) = L - H(q)

(every teacher crop appears in the same number of pairs, so the cross
entropy L splits exactly into the two). Uniform collapse: H -> ln K and
KL -> 0; collapse to one dimension: H -> 0 and KL -> 0, and also the
entropy of the batch-mean target H(mean_{i, b} q_i[b]) -> 0 (every image on
the same dimension), which tells it apart from images that are merely
sharply and differently assigned.

tau_t(epoch) rises linearly from ``warmup_teacher_temp`` to ``teacher_temp``
over ``warmup_teacher_temp_epochs`` epochs (per epoch, as in the official code),
then stays constant.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float,
                                 warmup_epochs: int, nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linspace over the warm-up, then constant."""
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)
    return np.concatenate((warmup, np.full(max(nepochs - warmup_epochs, 0), teacher_temp)))


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch: int) -> float:
        schedule = self.teacher_temp_schedule
        return float(schedule[min(epoch, len(schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """student_output ((ncrops * B, K)), teacher_output ((2 * B, K)) -> the scalar loss L. Updates
        ``center`` (after computing the loss, which uses the old one)."""
        return self._loss_and_targets(student_output, teacher_output, epoch)[0]

    def with_monitors(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                      epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`forward`, plus the collapse monitors {"teacher_entropy", "teacher_student_kl",
        "teacher_batch_entropy"} as 0-d tensors (no host sync)."""
        loss, teacher_probs = self._loss_and_targets(student_output, teacher_output, epoch)
        with torch.no_grad():
            entropy = -torch.special.xlogy(teacher_probs, teacher_probs).sum(dim=-1).mean()  # 0 log 0 = 0
            mean_target = teacher_probs.mean(dim=0)
            batch_entropy = -torch.special.xlogy(mean_target, mean_target).sum()
        return loss, {"teacher_entropy": entropy, "teacher_student_kl": loss.detach() - entropy,
                      "teacher_batch_entropy": batch_entropy}

    def _loss_and_targets(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                          epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, the teacher's targets q ((2 * B, K))); updates the center."""
        student_log_probs = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_chunks = student_log_probs.chunk(self.ncrops)
        teacher_probs = F.softmax((teacher_output.float() - self.center) / self.teacher_temp(epoch), dim=-1)
        teacher_chunks = teacher_probs.detach().chunk(2)

        total, pairs = student_output.new_zeros((), dtype=torch.float32), 0
        for teacher_index, target in enumerate(teacher_chunks):
            for student_index, log_probs in enumerate(student_chunks):
                if student_index == teacher_index:
                    continue  # the same global view: no self-prediction
                total = total + torch.sum(-target * log_probs, dim=-1).mean()
                pairs += 1
        self.update_center(teacher_output)
        return total / pairs, teacher_probs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the mean raw teacher logit over the global batch (all ranks)."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        count = torch.tensor([teacher_output.shape[0]], dtype=torch.float32, device=batch_sum.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_center = batch_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
