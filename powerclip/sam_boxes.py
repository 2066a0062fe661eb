"""Boxes-only automatic mask generation for SAM and SAM 2: the stock generators' regions, without masks.

The workflow keeps only each mask's bounding box and pixel area (:mod:`powerclip.regions`). The stock
generators (``SamAutomaticMaskGenerator``, ``SAM2AutomaticMaskGenerator``) upsample every mask to the
original image, encode the kept ones as RLE with a CPU loop per mask, and decode them again into binary
masks for their output records. This path stops at boxes and areas, on the model's device, and moves one
``(k, 5)`` tensor per image to the CPU. Otherwise it is the same computation, with the packages' own
functions (``utils.amg`` of each package):

* the same point grid (``build_all_layer_point_grids``), coordinate transforms, prompt-encoder and
  mask-decoder calls (3 masks per point), image preprocessing (SAM: ``ResizeLongestSide.apply_image`` +
  ``Sam.preprocess``; SAM 2: ``SAM2Transforms``, with SAM 2's hole filling when ``min_mask_region_area > 0``);
* the same filters in the same order: predicted IoU > ``pred_iou_thresh``; stability score
  (``calculate_stability_score`` on the logits at the original size) >= ``stability_score_thresh``;
  mask = logits > the mask threshold; box = ``batched_mask_to_box``; box NMS over all masks of the image
  with the predicted IoU as score (``batched_nms``, ``box_nms_thresh``); area = the mask's pixel count.
  The one change of order: the IoU filter runs before the upsampling, which is per mask, so the same
  masks are kept.

What differs on purpose: several images per image-encoder pass (``image_batch_size``), bf16 autocast of
the encoders and the decoder (logits are upsampled and thresholded in fp32), and SAM 2's resize and
normalisation on the device. Crops (``crop_n_layers > 0``) and SAM's opencv hole/island removal are not
implemented here: they need the stock generator. ``tests/test_sam.py`` checks the equivalence on CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from powerclip.grid import Region


@dataclass
class _Encoded:
    """One image after the image encoder: what the decoder and the upsampling need."""

    embedding: Any  # (1, C, h, w)
    original_size: tuple[int, int]  # (H, W) of the input image
    input_size: tuple[int, int] | None = None  # SAM: the resized image inside the padded square
    high_res: list | None = None  # SAM 2: the two high-resolution feature maps, each (1, C, h, w)


class SamAdapter:
    """segment_anything's ``Sam``: the calls ``SamPredictor`` makes, for a batch of images."""

    def __init__(self, model: Any) -> None:
        from segment_anything.utils import amg
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.amg = amg
        self.mask_threshold = model.mask_threshold  # a model attribute in segment_anything
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    def encode(self, arrays: list[np.ndarray]) -> list[_Encoded]:
        import torch

        inputs, sizes = [], []
        for array in arrays:
            resized = self.transform.apply_image(array)  # PIL resize of the uint8 image, as SamPredictor.set_image
            image = torch.as_tensor(resized, device=self.model.device).permute(2, 0, 1).contiguous()[None]
            inputs.append(self.model.preprocess(image))  # normalise, pad to the square input
            sizes.append(tuple(resized.shape[:2]))
        embeddings = self.model.image_encoder(torch.cat(inputs))
        return [
            _Encoded(embeddings[i : i + 1], tuple(array.shape[:2]), input_size=size)
            for i, (array, size) in enumerate(zip(arrays, sizes, strict=True))
        ]

    def decode(self, image: _Encoded, points: np.ndarray) -> tuple[Any, Any]:
        """Point prompts (n, 2) in original pixels -> low-res logits (3n, h, w) and predicted IoUs (3n,)."""
        import torch

        coords = torch.as_tensor(self.transform.apply_coords(points, image.original_size), device=self.model.device)
        labels = torch.ones(len(points), dtype=torch.int, device=coords.device)
        sparse, dense = self.model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=image.embedding,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        return low_res.flatten(0, 1), iou.flatten(0, 1)

    def upsample(self, image: _Encoded, low_res: Any) -> Any:
        """Low-res logits (k, h, w) -> fp32 logits (k, H, W) at the original size."""
        return self.model.postprocess_masks(low_res[:, None].float(), image.input_size, image.original_size)[:, 0]


class Sam2Adapter:
    """sam2's ``SAM2Base``: the calls ``SAM2ImagePredictor`` makes (``set_image_batch``, ``_predict``)."""

    def __init__(self, model: Any, mask_threshold: float = 0.0, min_mask_region_area: int = 0) -> None:
        from sam2.utils import amg
        from sam2.utils.transforms import SAM2Transforms

        self.model = model
        self.amg = amg
        self.mask_threshold = mask_threshold
        # As SAM2AutomaticMaskGenerator builds its predictor: holes and sprinkles up to min_mask_region_area.
        self.transforms = SAM2Transforms(
            resolution=model.image_size,
            mask_threshold=mask_threshold,
            max_hole_area=min_mask_region_area,
            max_sprinkle_area=min_mask_region_area,
        )

    def encode(self, arrays: list[np.ndarray]) -> list[_Encoded]:
        import torch

        device = self.model.device
        # ToTensor (HWC uint8 -> CHW float / 255) + the Resize/Normalize module, on the device.
        inputs = [
            self.transforms.transforms(torch.as_tensor(a, device=device).permute(2, 0, 1).contiguous().float().div(255))
            for a in arrays
        ]
        backbone_out = self.model.forward_image(torch.stack(inputs))
        _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        feats = [
            feat.permute(1, 2, 0).view(len(arrays), -1, *size)
            for feat, size in zip(vision_feats[::-1], feat_sizes[::-1], strict=True)
        ][::-1]
        return [
            _Encoded(feats[-1][i : i + 1], tuple(a.shape[:2]), high_res=[f[i : i + 1] for f in feats[:-1]])
            for i, a in enumerate(arrays)
        ]

    def decode(self, image: _Encoded, points: np.ndarray) -> tuple[Any, Any]:
        import torch

        points = torch.as_tensor(points, dtype=torch.float32, device=self.model.device)
        coords = self.transforms.transform_coords(points, normalize=True, orig_hw=image.original_size)
        labels = torch.ones(len(points), dtype=torch.int, device=coords.device)
        sparse, dense = self.model.sam_prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image.embedding,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=len(points) > 1,
            high_res_features=image.high_res,
        )
        return low_res.flatten(0, 1), iou.flatten(0, 1)

    def upsample(self, image: _Encoded, low_res: Any) -> Any:
        return self.transforms.postprocess_masks(low_res[:, None].float(), image.original_size)[:, 0]


class BoxesGenerator:
    """Point-grid automatic mask generation that returns, per image, a ``(k, 5)`` float array of
    ``x0, y0, x1, y1, area`` (inclusive pixel indices, as the stock generators' boxes), in the stock
    generator's order (descending predicted IoU after NMS)."""

    def __init__(
        self,
        adapter: SamAdapter | Sam2Adapter,
        points_per_side: int,
        points_per_batch: int,
        pred_iou_thresh: float,
        stability_score_thresh: float,
        box_nms_thresh: float,
        stability_score_offset: float = 1.0,
        image_batch_size: int = 1,
        autocast: Any = None,
    ) -> None:
        self.adapter = adapter
        self.grid = adapter.amg.build_all_layer_point_grids(points_per_side, 0, 1)[0]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.image_batch_size = image_batch_size
        self.autocast = autocast or contextlib.nullcontext

    def generate(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 HWC arrays -> one ``(k, 5)`` array per image."""
        out = []
        for start in range(0, len(arrays), self.image_batch_size):
            chunk = arrays[start : start + self.image_batch_size]
            with self.autocast():
                encoded = self.adapter.encode(chunk)
            out += [self._boxes(image) for image in encoded]
        return out

    def _boxes(self, image: _Encoded) -> np.ndarray:
        import torch
        from torchvision.ops.boxes import batched_nms

        amg, threshold = self.adapter.amg, self.adapter.mask_threshold
        height, width = image.original_size
        points = self.grid * np.array([[width, height]])  # as the stock generators scale their grid
        found = []  # per point batch: (boxes, areas, predicted IoUs) on the device
        for (batch,) in amg.batch_iterator(self.points_per_batch, points):
            with self.autocast():
                low_res, iou = self.adapter.decode(image, batch)
            iou = iou.float()
            if self.pred_iou_thresh > 0.0:
                keep = iou > self.pred_iou_thresh
                low_res, iou = low_res[keep], iou[keep]
            if len(iou) == 0:
                continue
            logits = self.adapter.upsample(image, low_res)
            if self.stability_score_thresh > 0.0:
                stability = amg.calculate_stability_score(logits, threshold, self.stability_score_offset)
                keep = stability >= self.stability_score_thresh
                logits, iou = logits[keep], iou[keep]
                if len(iou) == 0:
                    continue
            masks = logits > threshold
            found.append((amg.batched_mask_to_box(masks), masks.sum(dim=(-2, -1)), iou))
        if not found:
            return np.zeros((0, 5), dtype=np.float32)
        boxes, areas, scores = (torch.cat(parts) for parts in zip(*found, strict=True))
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), iou_threshold=self.box_nms_thresh)
        rows = torch.cat([boxes[keep].float(), areas[keep, None].float()], dim=1)
        return rows.cpu().numpy()


def boxes_to_regions(rows: np.ndarray) -> list[Region]:
    """:meth:`BoxesGenerator.generate`'s ``x0, y0, x1, y1, area`` rows (inclusive indices) -> regions: the
    same as ``powerclip.sam._masks_to_regions`` gives for the stock generator's records of the same masks
    (SAM's XYWH box + 1 in width and height)."""
    return [
        Region(area=float(area), bbox=(float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)))
        for x0, y0, x1, y1, area in rows.tolist()
    ]


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two XYWH boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else float(a == b)


def region_agreement(reference: list, candidate: list, top_k: int | None = 32, min_iou: float = 0.9) -> float:
    """How far two region lists agree where the workflow uses them: both are ordered as
    :func:`powerclip.regions.regions_to_cells` orders them (descending area, ties in segmenter order) and
    cut to ``top_k``; the result is the fraction of ranks whose two boxes have IoU >= ``min_iou``. A rank
    that only one list has counts as a miss; two empty lists agree fully."""

    def ranked(regions: list) -> list:
        return sorted(regions, key=lambda r: -float(r.area))[:top_k]

    ref, cand = ranked(reference), ranked(candidate)
    ranks = max(len(ref), len(cand))
    if ranks == 0:
        return 1.0
    return sum(_box_iou(r.bbox, c.bbox) >= min_iou for r, c in zip(ref, cand, strict=False)) / ranks
