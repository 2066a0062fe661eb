import json

import numpy as np
import pytest

from powerclip import csr


@pytest.mark.parametrize("groups", [[], [[]], [[1, 2, 3], [4, 5]], [[0], [], [7, 8, 9, 10]], [[5]] * 40])
def test_csr_round_trip(groups):
    lengths, indices = csr.to_csr(groups)
    assert lengths.tolist() == [len(g) for g in groups]
    assert csr.from_csr(lengths, indices) == [list(g) for g in groups]


def test_csr_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="sum to 3 but there are 2"):
        csr.from_csr([1, 2], [0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        csr.from_csr([-1, 1], [])


def test_njson_round_trip_and_layout():
    phrases = [[1, 2, 3], [2, 3], [5]]
    payload = csr.encode_njson(phrases)
    assert json.loads(payload) == {"lengths": [3, 2, 1], "indices": [1, 2, 3, 2, 3, 5]}
    assert csr.decode_njson(payload) == phrases
    assert csr.decode_njson(payload.decode()) == phrases
    assert csr.decode_njson(csr.encode_njson([])) == []


def test_njson_missing_key_is_a_clear_error():
    with pytest.raises(ValueError, match="lacks \\['indices'\\]"):
        csr.decode_njson(b'{"lengths": []}')


def test_region_arrays_dtypes_and_npy_round_trip():
    regions = [[0, 1, 8, 9], [63]]
    lengths, indices = csr.region_arrays(regions, num_cells=64)
    assert lengths.dtype == np.int32 and indices.dtype == np.int16
    back = csr.decode_regions(csr.npy_bytes(lengths), csr.npy_bytes(indices))
    assert back == regions
    big_lengths, big_indices = csr.region_arrays([[39999]], num_cells=200 * 200)
    assert big_indices.dtype == np.int32


def test_region_arrays_reject_out_of_range_cells():
    with pytest.raises(ValueError, match="out of range"):
        csr.region_arrays([[64]], num_cells=64)


def test_empty_regions_entry():
    lengths, indices = csr.region_arrays([], num_cells=196)
    assert lengths.shape == (0,) and indices.shape == (0,)
    assert csr.decode_regions(csr.npy_bytes(lengths), csr.npy_bytes(indices)) == []


@pytest.mark.parametrize(
    "array",
    [np.zeros(0, np.int16), np.arange(5, dtype=np.int16), np.arange(70000, dtype=np.int32),
     np.arange(6, dtype=np.int64).reshape(2, 3), np.arange(3, dtype=np.float32), np.arange(4, dtype=">i4")],
)  # fmt: skip
def test_npy_load_matches_numpy(array, monkeypatch):
    payload = csr.npy_bytes(array)
    expected = np.load(__import__("io").BytesIO(payload))
    out = csr.npy_load(payload)
    assert out.dtype == expected.dtype and out.shape == expected.shape and np.array_equal(out, expected)
    if array.ndim == 1 and array.dtype.kind in "iu" and array.dtype.byteorder != ">":
        monkeypatch.setattr(np, "load", None)  # the fast path must not need np.load
        assert np.array_equal(csr.npy_load(payload), expected)
