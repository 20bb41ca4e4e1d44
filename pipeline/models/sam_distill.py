"""SAM distillation from cached teacher outputs (training only).

Three terms, all against teacher outputs already warped onto the student's grids
(:func:`pipeline.training.teacher_targets.batch_warp_teacher_targets`):

* ``loss_feat_distill``: per distilled teacher level ``i`` (``distill_feat_layers``), a 1x1
  adapter maps student neck level ``min(i, L - 1)`` (``L`` student levels, finest first) to the
  teacher's width, and :func:`~pipeline.losses.distill.feat_distill_loss` compares it with the
  teacher map warped directly onto that level's grid; the mean over distilled levels.
* ``loss_cls_distill``: each query matched (final head stage) to a ground-truth segment is
  paired with the cached SAM segment of the same ``segment_id``; KL of class distributions.
* ``loss_mask_distill``: the same pairs; BCE of the student's mask logits against the teacher's
  softened mask probabilities, on valid pixels of the student's mask grid.

Matched segments with no cached counterpart are skipped and counted (:attr:`SamDistiller.stats`).

On unlabelled images (:meth:`SamDistiller.forward_unlabeled`) the same adapters give
``loss_feat_distill_unlabeled``; the final-stage queries are Hungarian-matched to the teacher's
automatic segments (:mod:`pipeline.losses.pseudo_label`), and each matched pair gets
``loss_cls_distill_unlabeled`` (KL against the pseudo-class soft labels) and
``loss_mask_distill_unlabeled``. ``loss_sam_distill_unlabeled = unlabeled_weight *
(feat_distill_weight * feat + output_distill_weight * (cls + mask))`` enters the total.
Logged terms are raw (unweighted); ``loss_sam_distill = feat_distill_weight * loss_feat_distill
+ output_distill_weight * (loss_cls_distill + loss_mask_distill)`` is the one term that enters the
total loss (the same convention as
:class:`~pipeline.models.resolution_distill.ResolutionDistiller`).
Teacher tensors are constants: gradients reach the student and the adapters only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from pipeline.losses.distill import cls_distill_loss, feat_distill_loss, mask_distill_loss
from pipeline.losses.pseudo_label import match_pseudo_labels

__all__ = ["SamDistiller"]


class SamDistiller(nn.Module):
    """Feature, class and mask distillation from the SAM teacher cache."""

    def __init__(
        self,
        *,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        distill_feat_layers: Sequence[int],
        feat_distill_weight: float,
        output_distill_weight: float,
        temperature: float,
        num_points: int,
        unlabeled_weight: float = 1.0,
        match_costs: tuple[float, float, float] = (2.0, 5.0, 5.0),
    ) -> None:
        """
        Arguments:
            student_channels: channels of each student neck level (finest first).
            teacher_channels: channels of each cached teacher level.
            distill_feat_layers: teacher levels to distil; level ``i`` is paired with student
                level ``min(i, len(student_channels) - 1)``.
            feat_distill_weight: weight of ``loss_feat_distill`` in ``loss_sam_distill``.
            output_distill_weight: weight of ``loss_cls_distill + loss_mask_distill``.
            temperature: softening temperature ``T`` of the class and mask targets.
            num_points: pixels sampled per mask for ``loss_mask_distill``.
            unlabeled_weight: weight of ``loss_sam_distill_unlabeled`` (unlabelled images).
            match_costs: ``(class, mask, dice)`` weights of the pseudo-label matching costs
                (the loss table's ``loss_cls``, ``loss_mask``, ``loss_dice`` weights).
        """
        super().__init__()
        student_channels, teacher_channels = list(student_channels), list(teacher_channels)
        if not student_channels or not teacher_channels:
            raise ValueError(
                f"need at least one student and one teacher level, got "
                f"student_channels={student_channels}, "
                f"teacher_channels={teacher_channels}"
            )
        bad = [i for i in distill_feat_layers if not 0 <= i < len(teacher_channels)]
        if bad or len(set(distill_feat_layers)) != len(distill_feat_layers):
            raise ValueError(
                f"model.sam_distill.distill_feat_layers={list(distill_feat_layers)}: "
                f"must be distinct teacher levels in [0, {len(teacher_channels)}) "
                f"(the cache has {len(teacher_channels)} levels)"
            )
        if temperature <= 0 or num_points < 1:
            raise ValueError(
                f"need temperature > 0 and num_points >= 1, got {temperature} and {num_points}"
            )
        self.teacher_channels = teacher_channels
        self.num_student_levels = len(student_channels)
        self.distill_feat_layers = [int(i) for i in distill_feat_layers]
        self.feat_distill_weight = float(feat_distill_weight)
        self.output_distill_weight = float(output_distill_weight)
        self.temperature = float(temperature)
        self.num_points = int(num_points)
        self.unlabeled_weight = float(unlabeled_weight)
        self.match_costs = tuple(float(c) for c in match_costs)
        self.adapters = nn.ModuleDict(
            {
                str(i): nn.Conv2d(student_channels[self.student_level(i)], teacher_channels[i], 1)
                for i in self.distill_feat_layers
            }
        )
        self.stats: dict[str, int] = {"matched": 0, "distilled": 0, "skipped_not_cached": 0}

    def student_level(self, teacher_level: int) -> int:
        """The student neck level paired with a teacher level: ``min(i, L - 1)``."""
        return min(teacher_level, self.num_student_levels - 1)

    def level_sizes(self, student_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int] | None]:
        """Destination grid of every cached teacher level (None where not distilled).

        Arguments:
            student_sizes: ``(h, w)`` of each student neck level.

        Returns:
            One entry per teacher level, for ``batch_warp_teacher_targets(level_sizes=...)``.
        """
        if len(student_sizes) != self.num_student_levels:
            raise ValueError(
                f"expected {self.num_student_levels} student level sizes, got {len(student_sizes)}"
            )
        return [
            tuple(int(v) for v in student_sizes[self.student_level(i)])
            if i in self.distill_feat_layers
            else None
            for i in range(len(self.teacher_channels))
        ]

    def forward(
        self,
        feats: dict[str, Any],
        outputs: dict[str, Any],
        indices: Sequence[tuple[Tensor, Tensor]],
        targets: Sequence[dict],
        teacher: dict[str, Any],
    ) -> dict[str, Tensor]:
        """
        Arguments:
            feats: student ``forward_features`` output (``neck_features``: list of
                ``[B, C_s, h_l, w_l]``).
            outputs: student ``forward_head`` output (``pred_logits [B, Q, K + 1]``,
                ``pred_masks [B, Q, h4, w4]``); only the final stage is distilled.
            indices: per image ``(query_idx, target_idx)`` of the final-stage matching.
            targets: per image the data sample dict (``segment_ids [N]``).
            teacher: the dict of ``batch_warp_teacher_targets`` for this batch, with features on
                the grids of :meth:`level_sizes` and masks on the ``pred_masks`` grid.

        Returns:
            ``loss_feat_distill``, ``loss_cls_distill``, ``loss_mask_distill`` (raw) and
            ``loss_sam_distill`` (weighted total).
        """
        if not isinstance(teacher, dict):
            raise TypeError(
                f"teacher must be the dict returned by batch_warp_teacher_targets "
                f"for the batch, got {type(teacher).__name__}"
            )
        neck = feats["neck_features"]
        if len(neck) != self.num_student_levels:
            raise ValueError(
                f"student has {len(neck)} neck levels, SamDistiller was built for "
                f"{self.num_student_levels}"
            )
        if len(teacher["features"]) != len(self.teacher_channels):
            raise ValueError(
                f"teacher has {len(teacher['features'])} feature levels, "
                f"SamDistiller was built for {len(self.teacher_channels)}"
            )

        feat_terms = []
        for i in self.distill_feat_layers:
            t_map, t_valid = teacher["features"][i], teacher["feature_valid"][i]
            s_map = neck[self.student_level(i)]
            if (
                t_map is None
                or t_map.shape[-2:] != s_map.shape[-2:]
                or t_map.shape[1] != self.teacher_channels[i]
            ):
                got = None if t_map is None else tuple(t_map.shape)
                raise ValueError(
                    f"teacher level {i} must be warped onto student level "
                    f"{self.student_level(i)} ([B, {self.teacher_channels[i]}, "
                    f"{s_map.shape[-2]}, {s_map.shape[-1]}]), got {got}"
                )
            adapted = self.adapters[str(i)](s_map)
            feat_terms.append(feat_distill_loss(adapted, t_map, t_valid))
        loss_feat = torch.stack(feat_terms).mean() if feat_terms else neck[0].sum() * 0.0

        s_logits, t_logits, s_masks, t_masks, valid = self._pair_segments(
            outputs, indices, targets, teacher
        )
        loss_cls = cls_distill_loss(s_logits, t_logits, self.temperature)
        loss_mask = mask_distill_loss(s_masks, t_masks, valid, self.temperature, self.num_points)
        total = self.feat_distill_weight * loss_feat + self.output_distill_weight * (
            loss_cls + loss_mask
        )
        return {
            "loss_feat_distill": loss_feat,
            "loss_cls_distill": loss_cls,
            "loss_mask_distill": loss_mask,
            "loss_sam_distill": total,
        }

    def _feat_terms(self, feats: dict[str, Any], teacher: dict[str, Any]) -> Tensor:
        neck = feats["neck_features"]
        terms = []
        for i in self.distill_feat_layers:
            t_map, t_valid = teacher["features"][i], teacher["feature_valid"][i]
            adapted = self.adapters[str(i)](neck[self.student_level(i)])
            terms.append(feat_distill_loss(adapted, t_map, t_valid))
        return torch.stack(terms).mean() if terms else neck[0].sum() * 0.0

    def forward_unlabeled(
        self, feats: dict[str, Any], outputs: dict[str, Any], teacher: dict[str, Any]
    ) -> dict[str, Tensor]:
        """Distillation on unlabelled images (no ground truth; see the module docstring).

        Arguments:
            feats: student ``forward_features`` output of the unlabelled images
                (``neck_features``: list of ``[B_u, C_s, h_l, w_l]``).
            outputs: student ``forward_head`` output of the same images (``pred_logits
                [B_u, Q, K + 1]``, ``pred_masks [B_u, Q, h4, w4]``).
            teacher: their warped unlabelled-cache entries (confident segments only), as
                :meth:`forward`'s ``teacher``.

        Returns:
            ``loss_feat_distill_unlabeled``, ``loss_cls_distill_unlabeled``,
            ``loss_mask_distill_unlabeled`` (raw) and ``loss_sam_distill_unlabeled`` (weighted).
        """
        loss_feat = self._feat_terms(feats, teacher)
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        s_cls, t_cls, s_m, t_m, valid = [], [], [], [], []
        matched = 0
        for b in range(pred_logits.shape[0]):
            ok = teacher["mask_valid"][b]
            masks = teacher["mask_logits"][b]
            cls = teacher["cls_logits"][b]
            seen = ((masks > 0) & ok).flatten(1).any(1)  # segments with a pixel in this view
            masks, cls = masks[seen], cls[seen]
            q_idx, t_idx = match_pseudo_labels(
                pred_logits[b].detach(),
                pred_masks[b].detach(),
                (cls / self.temperature).softmax(-1),
                masks,
                ok,
                cost_class=self.match_costs[0],
                cost_mask=self.match_costs[1],
                cost_dice=self.match_costs[2],
            )
            q_idx, t_idx = q_idx.to(pred_logits.device), t_idx.to(pred_logits.device)
            matched += int(q_idx.numel())
            s_cls.append(pred_logits[b, q_idx])
            t_cls.append(cls[t_idx])
            s_m.append(pred_masks[b, q_idx])
            t_m.append(masks[t_idx])
            valid.append(ok.expand(len(q_idx), -1, -1))
        self.stats_unlabeled = {"matched": matched}
        loss_cls = cls_distill_loss(torch.cat(s_cls), torch.cat(t_cls), self.temperature)
        loss_mask = mask_distill_loss(
            torch.cat(s_m), torch.cat(t_m), torch.cat(valid), self.temperature, self.num_points
        )
        total = self.unlabeled_weight * (
            self.feat_distill_weight * loss_feat
            + self.output_distill_weight * (loss_cls + loss_mask)
        )
        return {
            "loss_feat_distill_unlabeled": loss_feat,
            "loss_cls_distill_unlabeled": loss_cls,
            "loss_mask_distill_unlabeled": loss_mask,
            "loss_sam_distill_unlabeled": total,
        }

    def _pair_segments(
        self,
        outputs: dict[str, Any],
        indices: Sequence[tuple[Tensor, Tensor]],
        targets: Sequence[dict],
        teacher: dict[str, Any],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Student and teacher class logits and masks of matched queries whose segment is cached.

        Returns:
            ``student_logits [P, K + 1]``, ``teacher_logits [P, K]``, ``student_masks
            [P, h4, w4]``, ``teacher_masks [P, h4, w4]``, ``valid [P, h4, w4]``.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        if len(indices) != pred_logits.shape[0] or len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"batch of {pred_logits.shape[0]} images but {len(indices)} "
                f"matchings and {len(targets)} targets"
            )
        if teacher["mask_valid"].shape[-2:] != pred_masks.shape[-2:]:
            raise ValueError(
                f"teacher masks are on a {tuple(teacher['mask_valid'].shape[-2:])} "
                f"grid, pred_masks on {tuple(pred_masks.shape[-2:])}"
            )
        num_classes = pred_logits.shape[-1] - 1
        parts: list[list[Tensor]] = [[], [], [], [], []]
        matched = distilled = 0
        for b, (q_idx, t_idx) in enumerate(indices):
            q_idx, t_idx = q_idx.to(pred_logits.device), t_idx.to(pred_logits.device)
            matched += int(q_idx.numel())
            t_cls = teacher["cls_logits"][b]
            if t_cls.shape[1] != num_classes:
                raise ValueError(
                    f"teacher cls_logits have {t_cls.shape[1]} classes, the student "
                    f"{num_classes} (+1 no-object)"
                )
            seg = targets[b]["segment_ids"].to(pred_logits.device)[t_idx]  # [n]
            cached = teacher["segment_ids"][b].to(pred_logits.device)  # [M]
            same = seg[:, None] == cached[None, :]  # [n, M]
            found = same.any(1)
            pos = same.to(torch.uint8).argmax(1)[found]
            q = q_idx[found]
            distilled += int(found.sum())
            parts[0].append(pred_logits[b, q])
            parts[1].append(t_cls[pos])
            parts[2].append(pred_masks[b, q])
            parts[3].append(teacher["mask_logits"][b][pos])
            parts[4].append(teacher["mask_valid"][b].expand(len(q), -1, -1))
        self.stats = {
            "matched": matched,
            "distilled": distilled,
            "skipped_not_cached": matched - distilled,
        }
        return tuple(torch.cat(p) for p in parts)  # type: ignore[return-value]
