"""Training data: raw shards joined with their phrase and region sidecars, as padded index tensors.

Sources of a training shard (:class:`ShardSpec`): a raw shard plus sidecars (the workflow's layout,
joined key by key), or a *combined* shard in the official PowerCLIP format (``njson``, ``samlens.npy``
and ``samcat.npy`` inside the same tar). A key missing from a sidecar, or out of order, is an error that
names the shard and the key.

The stream follows open_clip's ``--dataset-resampled`` practice: every (rank, worker) draws shards with
replacement from the whole list, with its own seeded RNG, and a sample shuffle buffer mixes shards.
Everything random (shard draws, shuffle buffer, random top-k regions) is a function of
(seed, epoch, rank, worker) or (seed, epoch, key), so an epoch's batches are reproducible: the trainer
resumes mid-epoch by rebuilding the epoch's stream and skipping the batches already consumed.

Images get open_clip's evaluation transform (resize the shorter side, centre crop, normalise) so that the
patch grid the regions were mapped onto (:class:`powerclip.regions.PatchGrid`) is exactly the model's.

A method that trains on synthetic captions (CLIPS: ``DataConfig.caption_views``) also gets the recaptions
sidecar (powerclip.recaptions) and, per sample, sub-captions of the synthetic caption for the text encoder
(:func:`subcaption_span`, or open_clip's truncation / random / block token reductions), the web caption and
the full synthetic caption as the captioner's targets; seeded by (seed, epoch, key) like random top-k.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from powerclip.csr import decode_njson, decode_regions
from powerclip.shards import IMAGE_EXTENSIONS, decode_image, image_field, iter_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    raw: str
    phrases: str | None = None  # None: the phrases are inside the raw shard (combined format)
    regions: str | None = None  # None: the regions are inside the raw shard (combined format)
    recaptions: str | None = None  # the recaptions sidecar (syn.txt, web.txt), for methods that read one


# Text-encoder views of a synthetic caption: ours (whole sentences) or open_clip's reductions
# (open_clip.tokenizer.get_reduction_mask_fn: "simple" is a random block, "random" random tokens in order).
TEXT_REDUCTIONS = {"subcaption": None, "truncate": None, "random": "random", "block": "simple"}
SYN, WEB = "syn.txt", "web.txt"  # the recaptions sidecar's members (powerclip.recaptions)


@dataclass(frozen=True)
class CaptionViews:
    """What a batch carries for CLIPS (docs/method.md, "clips"): ``views`` text-encoder views of each
    synthetic caption within ``tokens`` tokens (start and end of text included) made by ``reduction``, the
    web caption, and the full synthetic caption in ``caption_tokens`` + 1 positions (the captioner's targets)."""

    reduction: str = "subcaption"
    tokens: int = 32
    views: int = 2
    caption_tokens: int = 128

    def __post_init__(self):
        if self.reduction not in TEXT_REDUCTIONS:
            raise ValueError(f"text reduction {self.reduction!r} is not one of {sorted(TEXT_REDUCTIONS)}")
        if self.tokens < 3 or self.views < 1 or self.caption_tokens < 1:
            raise ValueError(f"caption views need tokens >= 3, views >= 1, caption_tokens >= 1: {self}")


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 64
    patch_size: int = 8  # with image_size, the grid that region cells index (row-major)
    context_length: int = 77
    topk: int = 5  # regions per image (the loss's M)
    topk_random: bool = False  # sample k regions at random instead of the k largest
    max_phrases: int = 16  # phrases per caption fed to the loss (the first ones in stored order)
    use_parse_phrases: bool = True  # False: every content token is its own phrase
    use_regions: bool = True  # False (plain CLIP): regions and phrases are not read at all
    caption_views: CaptionViews | None = None  # CLIPS: recaptions sidecar, sub-captions, captioner targets
    # True: images leave the workers as uint8 (C, H, W), a quarter of the bytes across the process boundary,
    # and the trainer normalises them on its device (normalize_images; the same values as open_clip's
    # ToTensor + Normalize). False: float tensors, normalised here.
    uint8_images: bool = False
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    seed: int = 0


class MissingSidecarError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def joined_samples(spec: ShardSpec, with_regions: bool = True, with_recaptions: bool = False) -> Iterator[dict]:
    """Raw samples of a shard with their sidecar fields merged in, key by key, in shard order."""
    needed = set(IMAGE_EXTENSIONS) | {"txt"}
    wanted = []
    if with_regions:
        needed |= {"njson", "samlens.npy", "samcat.npy"}
        wanted += [(spec.phrases, {"njson"}), (spec.regions, {"samlens.npy", "samcat.npy"})]
    if with_recaptions:
        wanted.append((spec.recaptions, {SYN, WEB}))
    raw = iter_samples(spec.raw, fields=needed)
    sidecars = [(path, iter_samples(path, fields=fields)) for path, fields in wanted if path is not None]
    required = (("njson", "samlens.npy", "samcat.npy") if with_regions else ()) + ((SYN,) if with_recaptions else ())
    for sample in raw:
        key = sample["__key__"]
        for path, stream in sidecars:
            other = next(stream, None)
            if other is None or other["__key__"] != key:
                found = "ends" if other is None else f"has {other['__key__']!r} there"
                raise MissingSidecarError(
                    f"sidecar {path} does not match raw shard {spec.raw}: sample {key!r} missing ({found}); "
                    "rebuild the sidecar (delete it and rerun the workflow)"
                )
            sample.update({k: v for k, v in other.items() if k != "__key__"})
        for field in required:
            if field not in sample:
                raise MissingSidecarError(f"{spec.raw}: sample {key!r} has no {field!r} (no sidecar given)")
        sample["__shard__"] = spec.raw
        yield sample
    for path, stream in sidecars:
        extra = next(stream, None)
        if extra is not None:
            raise MissingSidecarError(f"sidecar {path} has sample {extra['__key__']!r} that raw shard {spec.raw} lacks")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode("utf-8"))])


def select_regions(regions: list[list[int]], k: int, randomly: bool, rng: np.random.Generator | None) -> list[list[int]]:
    """The k largest regions (stored order is by descending area), or k drawn at random."""
    if len(regions) <= k:
        return regions
    if randomly:
        chosen = sorted(rng.choice(len(regions), size=k, replace=False).tolist())
        return [regions[i] for i in chosen]
    return regions[:k]


def token_phrases(num_tokens: int, context_length: int) -> list[list[int]]:
    """Every content token as its own phrase (positions 1..n; 0 is start-of-text)."""
    last = min(num_tokens, context_length - 2)
    return [[i] for i in range(1, last + 1)]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """A caption's sentences (split after ``.``, ``!`` or ``?`` followed by white space), white space
    normalised; a caption without such an end is one sentence."""
    return [part for part in _SENTENCE_END.split(" ".join(text.split())) if part]


def subcaption_span(lengths: Sequence[int], budget: int, rng: np.random.Generator) -> tuple[int, int]:
    """CLIPS's sub-caption: sentences ``[start, end)`` with ``start`` drawn uniformly, then the sentences
    after it while their token counts (``lengths``) still fit into ``budget``; at least the start sentence
    (the tokenizer truncates it when it alone is longer). No wrap-around past the last sentence."""
    start = int(rng.integers(len(lengths)))
    end, total = start + 1, lengths[start]
    while end < len(lengths) and total + lengths[end] <= budget:
        total += lengths[end]
        end += 1
    return start, end


@contextlib.contextmanager
def seeded_globals(rng: np.random.Generator) -> Iterator[None]:
    """Seed Python's and torch's global RNGs from ``rng`` for the duration (open_clip's token reductions draw
    from them), restoring both afterwards: the sample's views depend on (seed, epoch, key) only."""
    state = random.getstate()
    seed = int(rng.integers(2**63))
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def text_views(text: str, cfg: CaptionViews, tokenizer, rng: np.random.Generator, context_length: int) -> torch.Tensor:
    """``cfg.views`` token rows (views, context_length) of ``text``, each within ``cfg.tokens`` tokens (SOT and
    EOT included), zero-padded to the model's context length."""
    if cfg.tokens > context_length:
        raise ValueError(f"a text view of {cfg.tokens} tokens does not fit the model's context of {context_length}")
    out = torch.zeros(cfg.views, context_length, dtype=torch.long)
    if cfg.reduction == "subcaption":
        parts = sentences(text)
        lengths = [len(tokenizer.encode(part)) for part in parts]
        rows = []
        for _ in range(cfg.views):
            start, end = subcaption_span(lengths, cfg.tokens - 2, rng)
            rows.append(tokenizer([" ".join(parts[start:end])], context_length=cfg.tokens)[0])
        reduced = torch.stack(rows)
    elif cfg.reduction == "truncate":
        reduced = tokenizer([text] * cfg.views, context_length=cfg.tokens)
    else:
        from open_clip.tokenizer import get_reduction_mask_fn

        reduce = get_reduction_mask_fn(TEXT_REDUCTIONS[cfg.reduction])
        with seeded_globals(rng):
            reduced = reduce([text] * cfg.views, context_length=cfg.tokens, sot_token_id=tokenizer.sot_token_id,
                             eot_token_id=tokenizer.eot_token_id, encode_fn=tokenizer.encode)  # fmt: skip
    out[:, : cfg.tokens] = reduced
    return out


def uint8_transform(transform):
    """open_clip's evaluation transform without its last two steps (``ToTensor``, ``Normalize``): the same
    resized, centre-cropped RGB image as a uint8 (C, H, W) tensor; :func:`normalize_images` does the rest."""
    from torchvision import transforms as T

    *head, to_tensor, normalize = transform.transforms
    if not (isinstance(to_tensor, T.ToTensor) and isinstance(normalize, T.Normalize)):
        raise TypeError(f"expected a transform ending in ToTensor, Normalize, got {transform}")
    return T.Compose([*head, T.PILToTensor()])


@functools.lru_cache(maxsize=None)
def _normalization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's mean and std (the defaults of its image transform) as (1, C, 1, 1) tensors on ``device``,
    made once per device rather than at every step."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 normalised with open_clip's mean and std, on the images' device: the
    same arithmetic as ``ToTensor`` (divide by 255) then ``Normalize`` (subtract the mean, divide by the std)."""
    mean, std = _normalization(images.device)
    return images.float().div(255).sub_(mean).div_(std)


class SampleProcessor:
    """Decoded, transformed, tokenised sample from a joined raw sample."""

    def __init__(self, cfg: DataConfig, epoch: int = 0):
        import open_clip
        from open_clip.transform import image_transform

        self.cfg = cfg
        self.epoch = epoch
        self.transform = image_transform(cfg.image_size, is_train=False)
        if cfg.uint8_images:
            self.transform = uint8_transform(self.transform)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=cfg.context_length)

    def __call__(self, sample: dict) -> dict:
        key, shard = sample["__key__"], sample.get("__shard__")
        try:
            image = decode_image(sample[image_field(sample)])
            caption = sample["txt"].decode("utf-8")
        except Exception as exc:
            raise ValueError(f"{shard}: sample {key!r} cannot be decoded ({exc}); fetch the shard again") from exc
        text = self.tokenizer([caption])[0]
        out = {"key": key, "image": self.transform(image), "text": text, "regions": [], "phrases": []}
        if self.cfg.caption_views is not None:
            out.update(self.caption_views(sample))
        if not self.cfg.use_regions:
            return out
        rng = sample_rng(self.cfg.seed, self.epoch, key)
        regions = decode_regions(sample["samlens.npy"], sample["samcat.npy"])
        cells = (self.cfg.image_size // self.cfg.patch_size) ** 2
        if any(cell >= cells for region in regions for cell in region):
            raise ValueError(
                f"{shard}: sample {key!r} has a region cell >= {cells}, outside the model's "
                f"{self.cfg.image_size}/{self.cfg.patch_size} grid: its regions were mapped onto another grid; "
                "recompute them with the model's grid (config grid:) or train the matching model"
            )
        out["regions"] = select_regions(regions, self.cfg.topk, self.cfg.topk_random, rng)
        if self.cfg.use_parse_phrases:
            phrases = decode_njson(sample["njson"])
        else:
            phrases = token_phrases(int((text != 0).sum()) - 2, self.cfg.context_length)
        out["phrases"] = phrases[: self.cfg.max_phrases]
        return out

    def caption_views(self, sample: dict) -> dict:
        """CLIPS's fields: ``subcaptions`` (views, L) of the synthetic caption, ``web_text`` (L,) and
        ``caption`` (caption_tokens + 1,), the full synthetic caption the captioner predicts."""
        views = self.cfg.caption_views
        key, shard = sample["__key__"], sample.get("__shard__")
        try:
            synthetic, web = sample[SYN].decode("utf-8"), sample[WEB].decode("utf-8")
        except (KeyError, UnicodeDecodeError) as exc:
            raise ValueError(f"{shard}: sample {key!r} has no readable recaptions ({exc}); rebuild its recaptions sidecar") from exc
        rng = sample_rng(self.cfg.seed, self.epoch, key)
        return {
            "subcaptions": text_views(synthetic, views, self.tokenizer, rng, self.cfg.context_length),
            "web_text": self.tokenizer([web])[0],
            "caption": self.tokenizer([synthetic], context_length=views.caption_tokens + 1)[0],
        }


def check_sidecar_grid(specs: Sequence[ShardSpec], cfg: DataConfig) -> None:
    """Refuse regions sidecars mapped onto another grid than the model's, as their stage statistics record
    it (``<shard>.stats.json`` next to the sidecar; a sidecar without one is checked sample by sample)."""
    import json
    from pathlib import Path

    for spec in specs:
        if spec.regions is None:
            continue
        stats = Path(spec.regions).with_suffix(".stats.json")
        if not stats.is_file():
            log.warning("%s: no %s to check its grid against; its cells are checked sample by sample", spec.regions, stats.name)
            continue
        info = json.loads(stats.read_text()).get("info", {})
        grid = (info.get("image_size"), info.get("patch_size"))
        if grid != (cfg.image_size, cfg.patch_size):
            raise ValueError(
                f"{spec.regions}: its regions were mapped onto a {grid[0]}/{grid[1]} grid ({stats}), but the model's "
                f"grid is {cfg.image_size}/{cfg.patch_size} (image size / patch size); recompute the regions with "
                "config grid: equal to the model's, or train the matching model"
            )


def with_synthetic_caption(samples: Iterator[dict], spec: ShardSpec):
    """The samples whose recaptions entry is not empty (the recaption stage keeps an empty entry, counted in
    its stats, for a sample without a synthetic caption); returns how many were kept."""
    kept = left_out = 0
    for sample in samples:
        if sample[SYN]:
            kept += 1
            yield sample
        else:
            left_out += 1
    if left_out:
        log.debug("%s: %d samples without a synthetic caption left out (see %s)", spec.raw, left_out, spec.recaptions)
    return kept


def check_recaptions(specs: Sequence[ShardSpec]) -> None:
    """Refuse recaptions sidecars that are missing, or whose stats say that no sample has a synthetic caption."""
    missing = [s.raw for s in specs if s.recaptions is None or not Path(s.recaptions).is_file()]
    if missing:
        raise FileNotFoundError(f"no recaptions sidecar for {missing[:3]}: CLIPS needs --recaptions-dir (rule recaption_shard)")
    stats = [Path(s.recaptions).with_suffix(".stats.json") for s in specs]
    if all(p.is_file() for p in stats) and sum(json.loads(p.read_text())["samples_out"] for p in stats) == 0:
        raise ValueError(f"no sample of the {len(specs)} training shards has a synthetic caption ({stats[0]}, ...): "
                         "check datasets.<name>.recaptions in the config (source, join, columns)")  # fmt: skip


def pad_groups(groups: Sequence[Sequence[Sequence[int]]], slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample lists of index lists -> (index (B, slots, C), member mask (B, slots, C), slot mask (B, slots))."""
    width = max([len(g) for sample in groups for g in sample] + [1])
    index = np.zeros((len(groups), slots, width), dtype=np.int64)
    member = np.zeros((len(groups), slots, width), dtype=bool)
    for b, sample in enumerate(groups):
        for k, group in enumerate(sample[:slots]):
            index[b, k, : len(group)] = group
            member[b, k, : len(group)] = True
    member_t = torch.from_numpy(member)
    return torch.from_numpy(index), member_t, member_t.any(-1)


def collate(samples: Sequence[dict], cfg: DataConfig) -> dict:
    batch = {
        "key": [s["key"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
    }
    if cfg.caption_views is not None:
        for field in ("subcaptions", "web_text", "caption"):
            batch[field] = torch.stack([s[field] for s in samples])
    if cfg.use_regions:
        batch["region_index"], batch["region_cells"], batch["region_mask"] = pad_groups([s["regions"] for s in samples], cfg.topk)
        batch["phrase_index"], batch["phrase_tokens"], batch["phrase_mask"] = pad_groups(
            [s["phrases"] for s in samples], cfg.max_phrases
        )
    return batch


class ShardStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of batches for one rank (and each of its DataLoader workers)."""

    def __init__(self, specs: Sequence[ShardSpec], cfg: DataConfig, batch_size: int, epoch: int = 0, rank: int = 0):
        super().__init__()
        if not specs:
            raise ValueError("no training shards given")
        self.specs, self.cfg, self.batch_size, self.epoch, self.rank = list(specs), cfg, batch_size, epoch, rank
        if cfg.caption_views is not None:
            check_recaptions(self.specs)

    def _samples(self, worker: int) -> Iterator[dict]:
        import webdataset as wds

        shard_rng = random.Random(f"shards/{self.cfg.seed}/{self.epoch}/{self.rank}/{worker}")

        def draws():
            while True:
                yield self.specs[shard_rng.randrange(len(self.specs))]

        def samples(specs):
            empty_passes = 0
            for spec in specs:
                joined = joined_samples(spec, with_regions=self.cfg.use_regions, with_recaptions=self.cfg.caption_views is not None)
                if self.cfg.caption_views is None:
                    yield from joined
                    continue
                kept = yield from with_synthetic_caption(joined, spec)
                empty_passes = 0 if kept else empty_passes + 1
                if empty_passes > 8 * len(self.specs) + 8:
                    raise ValueError(f"{empty_passes} shard passes in a row without a sample that has a synthetic caption: "
                                     "check the recaptions sidecars' stats (results/<dataset>/recaptions.summary.json)")  # fmt: skip

        shuffle_seed = f"samples/{self.cfg.seed}/{self.epoch}/{self.rank}/{worker}"
        stream = wds.filters._shuffle(
            samples(draws()), self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng=random.Random(shuffle_seed)
        )
        process = SampleProcessor(self.cfg, self.epoch)
        for sample in stream:
            yield process(sample)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        batch: list[dict] = []
        for sample in self._samples(worker):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch, self.cfg)
                batch = []


def make_loader(
    specs: Sequence[ShardSpec],
    cfg: DataConfig,
    batch_size: int,
    epoch: int = 0,
    rank: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Endless batches for one rank; with several workers, batches alternate between them in order, each
    worker keeping 4 batches ready. ``pin_memory`` (for a CUDA trainer) lets the host-to-device copy of a
    batch overlap the step (``.to(device, non_blocking=True)``)."""
    stream = ShardStream(specs, cfg, batch_size, epoch, rank)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=pin_memory,
    )


def workflow_shards(dataset: str, shards: Sequence[str], region_source: str | None, root: str = ".") -> list[ShardSpec]:
    """ShardSpecs of the workflow's layout (raw shard + phrases + regions of one source)."""
    specs = []
    for shard in shards:
        raw = f"{root}/resources/{dataset}/shards/{shard}.tar"
        if region_source is None:
            specs.append(ShardSpec(raw))
        else:
            specs.append(
                ShardSpec(raw, f"{root}/results/{dataset}/phrases/{shard}.tar", f"{root}/results/{dataset}/regions/{region_source}/{shard}.tar")
            )
    return specs
