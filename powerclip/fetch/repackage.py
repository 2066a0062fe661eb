"""Sample-by-sample validation and copy of a fetched tar: the last step of every source but ``synthetic``.

Whatever a source brings (a local tar, img2dataset's output, a Hub release), only samples with a safe key,
a decodable image and a non-blank UTF-8 caption reach ``resources/<dataset>/shards/<shard>.tar``; each
dropped sample is counted under a reason, so ``samples_in == samples_out + samples_skipped`` holds for the
fetch stage too. Kept samples are copied byte for byte, all their fields.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from powerclip.shards import ShardWriter, StageStats, decode_image, image_field, iter_samples, key_problem

log = logging.getLogger(__name__)


def sample_problem(sample: dict) -> tuple[str, str | None] | None:
    """Why a raw sample cannot be used, as ``(reason, detail)``, or None if it is fine."""
    ext = image_field(sample)
    if ext is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        return "missing_image", f"fields {fields}"
    try:
        decode_image(sample[ext])
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the image is unusable
        return "image_not_decodable", f"{ext}: {type(exc).__name__}: {exc}"
    if "txt" not in sample:
        return "missing_caption", None
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        return "caption_not_utf8", str(exc)
    if not caption.strip():
        return "empty_caption", None
    return None


def check_rekey(rekey: str | None) -> None:
    if rekey is not None and (not rekey or "." in rekey or "/" in rekey):
        raise ValueError(f"rekey={rekey!r}: a shard name used as key prefix must be non-empty, without '.' or '/'")


def repackage_samples(
    samples: Iterable[dict], src_name: str, out_tar: str | os.PathLike, stats: StageStats, rekey: str | None = None
) -> None:
    """Write the usable ``samples`` into ``out_tar`` (atomically); see :func:`repackage_shard`."""
    check_rekey(rekey)
    out_tar = Path(out_tar)
    n_in = n_out = 0
    with ShardWriter(out_tar) as writer:
        for i, sample in enumerate(samples):
            n_in += 1
            stats.samples_in += 1
            key = f"{rekey}_{i:06d}" if rekey is not None else sample["__key__"]
            unsafe = key_problem(key)
            problem = ("unsafe_key", unsafe) if unsafe is not None else sample_problem(sample)
            if problem is not None:
                stats.skip(problem[0], sample["__key__"], problem[1])
                continue
            writer.write(key, {ext: data for ext, data in sample.items() if not ext.startswith("__")})
            n_out += 1
            stats.samples_out += 1
    if n_out == 0:
        log.warning("%s -> %s: no usable sample out of %d (see the skip reasons above)", src_name, out_tar, n_in)
    else:
        log.info("%s -> %s: kept %d of %d samples", src_name, out_tar, n_out, n_in)


def repackage_shard(
    src_tar: str | os.PathLike, out_tar: str | os.PathLike, stats: StageStats, rekey: str | None = None
) -> None:
    """Copy the usable samples of ``src_tar`` into ``out_tar`` (atomically), byte for byte.

    A sample is kept if its key is safe (:func:`powerclip.shards.key_problem`: no absolute path, ``..``,
    ``.`` or empty part, backslash or NUL, no dot in the name), it has an image (``jpg``/``jpeg``/``png``/
    ``webp``) that decodes and a ``txt`` caption that is valid UTF-8 and not blank; every other sample is
    counted in ``stats`` under ``unsafe_key``, ``missing_image``, ``image_not_decodable``,
    ``missing_caption``, ``caption_not_utf8`` or ``empty_caption``. Kept samples keep all their fields
    unchanged. With ``rekey`` (a shard name) the kept samples are renamed ``f"{rekey}_{i:06d}"``, ``i``
    counting the input samples (skipped ones included), e.g. for img2dataset output whose keys repeat
    across parts.

    Raises :class:`~powerclip.shards.ShardFormatError` (naming the file) if ``src_tar`` is not a readable
    tar; ``out_tar`` is then not created.
    """
    repackage_samples(iter_samples(src_tar), str(src_tar), out_tar, stats, rekey)
