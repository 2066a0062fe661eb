"""CSR ("compressed sparse row") lists of index lists, the on-disk form of phrases and regions.

A list of variable-length index lists ``[[1, 2, 3], [4, 5]]`` is stored as ``lengths = [3, 2]`` and
``indices = [1, 2, 3, 4, 5]`` (the concatenation). Two sidecar formats use it, with the names of the
official PowerCLIP release:

* phrases, ``{key}.njson``: UTF-8 JSON ``{"lengths": [...], "indices": [...]}``; indices are token
  positions in the OpenCLIP ``SimpleTokenizer`` output (0 = start-of-text).
* regions, ``{key}.samlens.npy`` (int32 lengths) + ``{key}.samcat.npy`` (int16 concatenated indices,
  int32 when a grid has more than 32767 cells); indices are row-major patch-grid cells.

An empty list (no phrase, no region) is ``lengths = []``, ``indices = []``: the sample keeps its entry
so that sidecars stay aligned with the raw shard key by key.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence

import numpy as np

NJSON_KEYS = ("lengths", "indices")


def to_csr(groups: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of indices -> (lengths int64, concatenated indices int64)."""
    lengths = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    if len(groups) and lengths.sum():
        indices = np.concatenate([np.asarray(g, dtype=np.int64) for g in groups if len(g)])
    else:
        indices = np.zeros(0, dtype=np.int64)
    return lengths, indices


def from_csr(lengths: Sequence[int] | np.ndarray, indices: Sequence[int] | np.ndarray) -> list[list[int]]:
    """(lengths, indices) -> lists of indices; raises ValueError if they do not fit together."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"CSR lengths must be >= 0, got {lengths.tolist()}")
    if int(lengths.sum()) != indices.size:
        raise ValueError(f"CSR lengths sum to {int(lengths.sum())} but there are {indices.size} indices")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [indices[bounds[i] : bounds[i + 1]].tolist() for i in range(lengths.size)]


def encode_njson(phrases: Sequence[Sequence[int]]) -> bytes:
    """Phrase token positions -> the ``.njson`` payload (compact UTF-8 JSON)."""
    lengths, indices = to_csr(phrases)
    obj = {"lengths": lengths.tolist(), "indices": indices.tolist()}
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode_njson(payload: bytes | str | dict) -> list[list[int]]:
    """The ``.njson`` payload (bytes, str or already-parsed dict) -> phrase token positions."""
    obj = json.loads(payload) if isinstance(payload, (bytes, str)) else payload
    missing = [k for k in NJSON_KEYS if k not in obj]
    if missing:
        raise ValueError(f"njson payload lacks {missing}; expected keys {list(NJSON_KEYS)}, got {sorted(obj)}")
    return from_csr(obj["lengths"], obj["indices"])


def region_arrays(regions: Sequence[Sequence[int]], num_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Region cell lists -> (``samlens`` int32, ``samcat`` int16 or int32 when cells do not fit int16)."""
    lengths, indices = to_csr(regions)
    if indices.size and (indices.min() < 0 or indices.max() >= num_cells):
        raise ValueError(f"region cell index out of range [0, {num_cells}): {indices.min()}..{indices.max()}")
    cat_dtype = np.int16 if num_cells <= np.iinfo(np.int16).max + 1 else np.int32
    return lengths.astype(np.int32), indices.astype(cat_dtype)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array in ``.npy`` format (what ``np.load`` and webdataset's npy decoder read)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# The header numpy writes for a 1-d array: {'descr': '<i2', 'fortran_order': False, 'shape': (12,), }
_NPY_1D_HEADER = re.compile(rb"\{'descr': '([<|][iu][1248])', 'fortran_order': False, 'shape': \((\d*),?\), \}")


def npy_load(payload: bytes | np.ndarray) -> np.ndarray:
    """``.npy`` bytes (or an already decoded array) -> array, never unpickling.

    The training loader reads two small arrays per sample; ``np.load`` parses each header with
    ``ast.literal_eval``, which costs more than the rest of the sample. Version-1 headers of 1-d integer
    arrays (what ``region_arrays`` writes) are parsed directly; anything else goes through ``np.load``.
    """
    if isinstance(payload, np.ndarray):
        return payload
    if payload[:8] == b"\x93NUMPY\x01\x00":
        header_len = int.from_bytes(payload[8:10], "little")
        match = _NPY_1D_HEADER.match(payload, 10, 10 + header_len)
        if match is not None:
            count = int(match.group(2) or 0)
            return np.frombuffer(payload, dtype=np.dtype(match.group(1).decode()), count=count, offset=10 + header_len)
    return np.load(io.BytesIO(payload), allow_pickle=False)


def decode_regions(samlens: bytes | np.ndarray, samcat: bytes | np.ndarray) -> list[list[int]]:
    """The ``samlens.npy`` + ``samcat.npy`` payloads -> region cell lists."""
    return from_csr(npy_load(samlens), npy_load(samcat))
