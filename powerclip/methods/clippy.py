"""``clippy``: CLIPpy's "minimal changes" (Ranasinghe et al., ICCV'23): the image tower max-pooled over its
patch tokens, the text tower average-pooled, open_clip's ``ClipLoss``. Two variants (run-table column
``clippy_towers``):

* ``scratch``: the run's own open_clip model (``train.model``) with ``vision_pool max`` / ``text_pool avg``
  (powerclip.model: the maximum over the patch tokens after ``ln_post``, then the projection), trained from
  scratch like every other row;
* ``published``: the towers of the replication (kahnchana/clippy, ``clippy-B-16``): a timm ViT (default DINO
  ViT-B/16, ``vit_base_patch16_224.dino``) through open_clip's ``TimmModel`` with no projection, max-pooled over
  its patch tokens after the trunk's final norm (:class:`PatchMaxPool`), and a Hugging Face T5 encoder (default
  Sentence-T5 base) through open_clip's ``HFTextEncoder`` with mean pooling and Sentence-T5's dense layer as its
  projection; pretrained weights from hub ids or local paths (``clippy_image_tower``, ``clippy_text_tower``).

The published towers are rebuilt from a checkpoint by :func:`powerclip.model.load_model` like any other model
(``powerclip.towers.set_tower_pools`` is its pooling step for these towers), and their patch tokens come
from :func:`powerclip.model.encode_image_tokens` (``powerclip.towers.timm_image_tokens``). See docs/method.md ("clippy").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH
from torch import Tensor, nn

from powerclip.methods.clip import ClipMethod
from powerclip.model import create_model, unwrap_model
from powerclip.towers import CLIPPY_POOLS, install_t5_text_tower

log = logging.getLogger(__name__)

# Sentence-T5's dense layer (a sentence-transformers Dense module: `linear.weight`, no bias), tried in order.
DENSE_FILES = ("2_Dense/model.safetensors", "2_Dense/pytorch_model.bin")
_LOCK = threading.Lock()
_CONFIG_DIR: Path | None = None


# ------------------------------------------------------------------------------------ published towers
def published_config(
    image_tower: str, text_tower: str, image_size: int, context_length: int = DEFAULT_CONTEXT_LENGTH
) -> dict:
    """The open_clip model config of the published towers: a timm trunk with no pooling of its own and no
    projection (``timm_pool ""``, ``timm_proj "none"``: :func:`set_tower_pools` adds the max pool) and an HF
    text tower with mean pooling and a linear projection; ``embed_dim`` = the trunk's width (768 for ViT-B)."""
    import timm
    from transformers import AutoConfig

    with torch.device("meta"):  # the width only: nothing is allocated or downloaded
        width = timm.create_model(image_tower, pretrained=False, num_classes=0).num_features
    text = AutoConfig.from_pretrained(text_tower)
    if text.model_type == "t5" and not text.is_encoder_decoder:
        raise ValueError(
            f"{text_tower}: its config.json says is_encoder_decoder false (transformers >= 5 saves a T5EncoderModel "
            "so); open_clip's HF adapter takes a T5's encoder only from an encoder-decoder config, as the Hub's "
            "Sentence-T5 has it: set is_encoder_decoder to true in that config.json"
        )
    return {
        "embed_dim": int(width),
        "vision_cfg": {"timm_model_name": image_tower, "timm_pool": "", "timm_proj": "none", "image_size": image_size},
        "text_cfg": {
            "hf_model_name": text_tower,
            "hf_tokenizer_name": text_tower,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        },
    }


def register_published_config(model_cfg: dict) -> str:
    """Register ``model_cfg`` with open_clip under a name derived from its content; returns the name."""
    global _CONFIG_DIR
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    name = f"clippy-published-{digest}"
    with _LOCK:
        if open_clip.get_model_config(name) is None:
            if _CONFIG_DIR is None:
                _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="powerclip-clippy-"))
            path = _CONFIG_DIR / f"{name}.json"
            path.write_text(json.dumps(model_cfg, indent=2))
            open_clip.add_model_config(path)
    return name


def _dense_file(text_tower: str) -> Path | None:
    """Sentence-T5's dense layer file in a local folder or a Hub repository (None when it has none)."""
    if os.path.isdir(text_tower):
        return next((Path(text_tower) / name for name in DENSE_FILES if (Path(text_tower) / name).is_file()), None)
    from huggingface_hub import hf_hub_download

    from powerclip.fetch.huggingface import NotOnHub, hub_call

    for name in DENSE_FILES:
        try:
            return Path(hub_call(lambda: hf_hub_download(text_tower, name), f"{text_tower}: {name}"))
        except NotOnHub:
            continue
    return None


def load_dense_projection(model: nn.Module, text_tower: str) -> bool:
    """Copy Sentence-T5's dense layer (``linear.weight``) into the HF tower's projection; False when the text
    tower has none (a plain T5: the projection keeps its random initialisation)."""
    path = _dense_file(text_tower)
    if path is None:
        log.warning("%s has no %s: the text projection starts from random weights", text_tower, " or ".join(DENSE_FILES))
        return False
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    proj = model.text.proj
    weight = state.get("linear.weight")
    if weight is None or not isinstance(proj, nn.Linear) or weight.shape != proj.weight.shape:
        raise ValueError(
            f"{path}: expected a dense layer 'linear.weight' of shape {tuple(getattr(proj, 'weight', torch.empty(0)).shape)}"
            f" for the text projection, found {sorted(state)} (is {text_tower!r} a Sentence-T5 model?)"
        )
    with torch.no_grad():
        proj.weight.copy_(weight)
    log.info("text projection from %s", path)
    return True


def build_published(args) -> nn.Module:
    """The published towers at the run's image size, seeded; with ``clippy_pretrained`` the timm trunk's and
    the T5 encoder's weights come from ``clippy_image_tower`` / ``clippy_text_tower`` (hub ids or local paths,
    loaded by timm and transformers) and Sentence-T5's dense layer becomes the text projection. The checkpoint
    records ``pretrained_image/text: False``: a rebuilt model takes the checkpoint's weights, never the hub's."""
    from powerclip.settings import model_config, model_grid

    install_t5_text_tower()
    image_size, _ = model_grid(model_config(args.model))
    name = register_published_config(published_config(args.clippy_image_tower, args.clippy_text_tower, image_size))
    pretrained = bool(args.clippy_pretrained)
    model = create_model(name, *CLIPPY_POOLS, seed=args.seed, pretrained_image=pretrained, pretrained_text=pretrained)
    if pretrained:
        load_dense_projection(model, args.clippy_text_tower)
    model.powerclip_cfg["create_kwargs"] = {"pretrained_image": False, "pretrained_text": False}
    model.powerclip_cfg["tower_weights"] = (
        {"image": args.clippy_image_tower, "text": args.clippy_text_tower} if pretrained else None
    )
    return model


# --------------------------------------------------------------------------------------------- method
def clip_captions(text: Tensor) -> list[str]:
    """The captions behind CLIP token ids (B, L), as CLIP's tokenizer saw them (cleaned, lower-cased), without
    start/end-of-text and padding."""
    from open_clip.tokenizer import _tokenizer

    sot, eot = _tokenizer.all_special_ids[:2]
    captions = []
    for row in text.tolist():
        ids = [t for t in row if t not in (0, sot)]
        ids = ids[: ids.index(eot)] if eot in ids else ids
        captions.append(_tokenizer.decode(ids).strip())
    return captions


class ClippyMethod(ClipMethod):
    """CLIP's loss on CLIPpy's pooled features (pooled features only: no token features are needed)."""

    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__(model, loss)
        bare = unwrap_model(model)
        # The data stream tokenizes captions with CLIP's tokenizer; the HF tower reads its own tokens.
        self.tokenizer = open_clip.get_tokenizer(bare.powerclip_cfg["model_name"]) if isinstance(
            getattr(bare, "text", None), HFTextEncoder
        ) else None

    @classmethod
    def build_model(cls, args) -> nn.Module:
        if (args.vision_pool, args.text_pool) != CLIPPY_POOLS:
            raise ValueError(
                f"method clippy pools as CLIPpy does: vision_pool max and text_pool avg (got {args.vision_pool!r}, "
                f"{args.text_pool!r}); set them in the run's row"
            )
        if args.clippy_towers == "published":
            return build_published(args)
        return super().build_model(args)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        text = batch["text"]
        if self.tokenizer is not None:
            text = self.tokenizer(clip_captions(text)).to(text.device)
        image = F.normalize(self.model.encode_image(batch["image"]), dim=-1)
        text = F.normalize(self.model.encode_text(text), dim=-1)
        logit_scale = self.model.logit_scale.exp()
        loss = self.loss(image, text, logit_scale)
        return {"loss": loss, "contrastive_loss": loss, "logit_scale": logit_scale}
