"""torch_pickle: torch.save checkpoints read and written without torch, refusing anything but tensors."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from spinquant_onnx.errors import InputError
from spinquant_onnx.io.torch_pickle import _Pickle, load_torch, save_torch

torch = pytest.importorskip("torch")

BF16 = np.dtype(ml_dtypes.bfloat16)


def _numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy (bf16 through its bits)."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16)
    return tensor.numpy()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    bits = [np.ascontiguousarray(np.atleast_1d(x)).view(np.uint8) for x in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(*bits)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
)
def test_reads_torch_save(tmp_path: Path, dtype) -> None:
    tensor = (torch.randn(7, 5) * 3).to(dtype)
    torch.save(tensor, tmp_path / "t.pth")
    got = load_torch(tmp_path / "t.pth")
    assert _same(got, _numpy(tensor))


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16, BF16, np.float64, np.int32, np.uint8])
def test_written_file_loads_with_weights_only(tmp_path: Path, np_dtype) -> None:
    values = (np.random.default_rng(0).standard_normal((6, 9)) * 4).astype(np_dtype)
    save_torch(tmp_path / "w.pth", values)
    loaded = torch.load(tmp_path / "w.pth", weights_only=True)
    assert isinstance(loaded, torch.Tensor) and tuple(loaded.shape) == values.shape
    assert _same(_numpy(loaded), values)
    mapped = torch.load(tmp_path / "w.pth", weights_only=True, mmap=True)  # needs 64-byte aligned records
    assert _same(_numpy(mapped), values)
    assert _same(load_torch(tmp_path / "w.pth"), values)


def test_views_with_offsets_and_strides(tmp_path: Path) -> None:
    base = torch.arange(120, dtype=torch.float32)
    half = torch.randn(8, 6).to(torch.bfloat16)
    views = {
        "offset": base[10:30].view(4, 5),
        "transposed": base.view(12, 10).t()[2:5, 1:7],
        "stepped": base[5::3],
        "bf16_transposed": half.t()[1:4],
        "scalar": base[17],
        "empty": base[3:3].view(0, 4),
    }
    torch.save(views, tmp_path / "views.pth")
    got = load_torch(tmp_path / "views.pth")
    assert list(got) == list(views)
    for name, tensor in views.items():
        assert _same(got[name], _numpy(tensor)), name


def test_spinquant_rotation_dict_round_trip(tmp_path: Path) -> None:
    """SpinQuant's R.bin: {"R1": [h, h], "model.layers.<i>.self_attn.R2": [hd, hd]} in float64."""
    rng = np.random.default_rng(1)
    r1 = np.linalg.qr(rng.standard_normal((64, 64)))[0]
    r2 = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    theirs = {"R1": torch.from_numpy(r1), "model.layers.0.self_attn.R2": torch.from_numpy(r2)}
    torch.save(theirs, tmp_path / "R.bin")
    got = load_torch(tmp_path / "R.bin")
    assert set(got) == set(theirs) and _same(got["R1"], r1) and _same(got["model.layers.0.self_attn.R2"], r2)

    save_torch(tmp_path / "ours.bin", got)
    back = torch.load(tmp_path / "ours.bin", weights_only=True)
    assert list(back) == ["R1", "model.layers.0.self_attn.R2"]
    assert torch.equal(back["R1"], theirs["R1"]) and back["R1"].dtype == torch.float64


def test_parameters_and_state_dicts(tmp_path: Path) -> None:
    layer = torch.nn.Linear(4, 3)
    torch.save(layer.weight, tmp_path / "param.pth")  # _rebuild_parameter
    assert _same(load_torch(tmp_path / "param.pth"), _numpy(layer.weight))
    torch.save(layer.state_dict(), tmp_path / "state.pth")  # OrderedDict with _metadata (BUILD)
    got = load_torch(tmp_path / "state.pth")
    assert set(got) == {"weight", "bias"} and _same(got["bias"], _numpy(layer.bias))


def test_large_record_is_memory_mapped(tmp_path: Path) -> None:
    values = np.arange(5_000_000, dtype=np.float32)  # 20 MB: above the memory-map threshold
    save_torch(tmp_path / "big.pth", {"w": values})
    got = load_torch(tmp_path / "big.pth")["w"]
    assert np.array_equal(got, values) and not got.flags.writeable
    assert torch.equal(torch.load(tmp_path / "big.pth", weights_only=True)["w"], torch.from_numpy(values))


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(3), "extra": _Payload(marker)}, path)
    with pytest.raises(InputError) as info:
        load_torch(path)
    message = str(info.value)
    assert "system" in message and str(path) in message and "refusing to unpickle" in message
    assert not marker.exists(), "the payload ran"
    # The payload is live: an unrestricted load does run it (so the refusal above is what stopped it).
    torch.load(path, weights_only=False)
    assert marker.exists()


def _zip_with_pickle(path: Path, data: bytes, storages: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")


def test_protocol4_stack_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(_Payload(marker), protocol=4)  # posix.system through STACK_GLOBAL
    _zip_with_pickle(tmp_path / "evil4.pth", data)
    with pytest.raises(InputError, match="refusing to unpickle global 'posix.system'"):
        load_torch(tmp_path / "evil4.pth")
    assert not marker.exists()


def _tensor_pickle(numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """data.pkl for one float tensor, with whatever offset/size/stride a hostile file might claim."""
    out = _Pickle()
    out.global_("torch._utils", "_rebuild_tensor_v2")
    out.out += b"(("
    out.string("storage")
    out.global_("torch", "FloatStorage")
    out.string("0")
    out.string("cpu")
    out.integer(numel)
    out.out += b"tQ"
    out.integer(offset)
    out.int_tuple(size)
    out.int_tuple(stride)
    out.out += b"\x89}tR"  # requires_grad False, hooks {}, REDUCE
    return out.finish()


def test_out_of_bounds_view_is_refused(tmp_path: Path) -> None:
    raw = np.arange(10, dtype=np.float32).tobytes()
    _zip_with_pickle(tmp_path / "ok.pth", _tensor_pickle(10, 2, (2, 4), (4, 1)), {"0": raw})
    assert np.array_equal(load_torch(tmp_path / "ok.pth"), np.arange(2, 10, dtype=np.float32).reshape(2, 4))
    _zip_with_pickle(tmp_path / "oob.pth", _tensor_pickle(10, 2, (3, 4), (4, 1)), {"0": raw})
    with pytest.raises(InputError, match="reaches element 13 of storage '0', which holds 10"):
        load_torch(tmp_path / "oob.pth")
    _zip_with_pickle(tmp_path / "short.pth", _tensor_pickle(1000, 0, (10,), (1,)), {"0": raw})
    with pytest.raises(InputError, match="holds 40 bytes, 4000 expected"):
        load_torch(tmp_path / "short.pth")


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    save_torch(good, {"w": np.ones((64, 64), dtype=np.float32)})
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a zip archive"):
        load_torch(truncated)

    flipped = bytearray(data)
    start = data.index(np.ones(1, dtype=np.float32).tobytes() * 16)  # inside the storage record
    flipped[start + 5] ^= 0xFF
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(InputError, match="corrupt checkpoint"):
        load_torch(corrupt)

    legacy = tmp_path / "legacy.pth"
    torch.save(torch.ones(3), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="legacy"):
        load_torch(legacy)

    with pytest.raises(InputError, match="no such file"):
        load_torch(tmp_path / "missing.pth")


def test_non_tensor_contents_are_refused(tmp_path: Path) -> None:
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(InputError, match="holds a list"):
        load_torch(tmp_path / "list.pth")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(InputError, match="entry 'step' is a int"):
        load_torch(tmp_path / "mixed.pth")
    with pytest.raises(InputError, match="expected a numpy array"):
        save_torch(tmp_path / "bad.pth", {"w": [1, 2]})
    assert not (tmp_path / "bad.pth").exists()


def test_ordered_dict_keys_keep_their_order(tmp_path: Path) -> None:
    values = collections.OrderedDict((f"k{i}", np.full((2,), i, dtype=np.float16)) for i in (3, 1, 2))
    save_torch(tmp_path / "o.pth", values)
    assert list(torch.load(tmp_path / "o.pth", weights_only=True)) == ["k3", "k1", "k2"]
    assert list(load_torch(tmp_path / "o.pth")) == ["k3", "k1", "k2"]
