"""``learn``: the torch interpreter matches ORT; learned rotations are orthogonal and exact; runs resume, repeat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from spinquant_onnx.cli import main  # noqa: E402
from spinquant_onnx.core.pipeline import convert  # noqa: E402
from spinquant_onnx.integrations.learn.interpreter import TorchGraph, to_torch  # noqa: E402
from spinquant_onnx.integrations.learn.model import QuantModel  # noqa: E402
from spinquant_onnx.integrations.learn.quantizers import scheme  # noqa: E402
from spinquant_onnx.integrations.learn.train import LearnConfig, Learner  # noqa: E402
from spinquant_onnx.rotation.learned_file import load_rotation_file  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OUTLIER = FIXTURES / "llama_outlier_ts.onnx"


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 11)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60, shape)


def _ort_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "name",
    [
        "llama_ts",
        "llama_dynamo",
        "qwen2_ts",
        "phi3_dynamo",
        "llama_tied_dynamo",
        "families/gemma2_eager_tf5_ts17",
        "families/olmo2_dy18",
        "families/granite_ts17",
        "families/cohere_dy18",
    ],
)
def test_interpreter_reproduces_onnxruntime(name: str) -> None:
    path = FIXTURES / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path.name} not in this checkout")
    model = onnx.load(str(path))
    constants = {t.name: to_torch(onnx.numpy_helper.to_array(t)) for t in model.graph.initializer}
    graph = TorchGraph(model.graph, constants, [model.graph.output[0].name])
    ids = _ids()
    with torch.no_grad():
        feeds = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(ids.shape, dtype=torch.int64)}
        got = graph.run(feeds)
    ref = _ort_logits(path, ids)
    assert _rel(got[0].numpy(), ref) < 1e-5
    assert (got[0].numpy().argmax(-1) == ref.argmax(-1)).all()


def test_interpreter_refuses_unknown_ops_by_name() -> None:
    model = onnx.load(str(FIXTURES / "llama_ts.onnx"))
    model.graph.node[0].op_type = "FancyOp"
    with pytest.raises(Exception, match="FancyOp"):
        TorchGraph(model.graph, {}, [model.graph.output[0].name])


@pytest.mark.parametrize("name", ["llama_outlier_ts", "qwen2_dynamo", "phi3_ts", "llama_tied_dynamo"])
def test_rotated_float_graph_is_the_same_function(name: str) -> None:
    """Any rotation, replayed through the plan in torch, leaves the float model's logits unchanged."""
    path = FIXTURES / f"{name}.onnx"
    model = QuantModel(path, scheme("w8a8"), {"r1", "r2"}, r4=True, seed=0)
    with torch.no_grad():
        for param in model.rotations.params:
            param.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        ids = _ids()
        got = model.logits(ids, quantize=False).numpy()
        quantized = model.logits(ids).numpy()
    ref = _ort_logits(path, ids)
    assert _rel(got, ref) < 1e-5
    assert 1e-4 < _rel(quantized, ref) < 0.5  # the quantizers are really in the graph, and sane


def _tokens(tmp_path: Path, count: int = 4096 + 32 * 8) -> Path:
    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(3).integers(0, 64, count).astype(np.int32))
    return path


def _learn_argv(tmp_path: Path, out: Path, steps: int) -> list[str]:
    """learn on the outlier fixture: the model, tokens, output, steps and window length every test gives."""
    return ["learn", str(OUTLIER), "--tokens", str(_tokens(tmp_path)), "--out", str(out), "--steps", str(steps),
            "--window-len", "32"]


def _learn(tmp_path: Path, name: str, steps: int, resume: bool = False, seed: int = 0, **extra: str) -> Path:
    out = tmp_path / name
    argv = [
        *_learn_argv(tmp_path, out, steps),
        "--seed",
        str(seed),
        "--threads",
        "1",
        "--save-every",
        "1",
        "--quiet",
        *("--keep", "last", "--optimizer", "adam", "--lr", "1e-3", "--eval-every", "2"),
    ]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", value]
    assert main([*argv, "--resume"] if resume else argv) == 0
    return out


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_learned_rotations_are_orthogonal_and_rotate_exactly(tmp_path: Path) -> None:
    out = _learn(tmp_path, "r.npz", steps=3)
    arrays = _arrays(out)
    assert set(arrays) == {"R1", "model.layers.0.self_attn.R2", "model.layers.1.self_attn.R2"}
    for matrix in arrays.values():
        assert np.abs(matrix @ matrix.T - np.eye(len(matrix))).max() < 1e-12
    hadamard = _arrays(_learn(tmp_path, "zero.npz", steps=0))["R1"]
    assert np.abs(arrays["R1"] - hadamard).max() > 1e-6  # it moved from the Hadamard start
    learned = load_rotation_file(out)
    assert learned.notes == []  # no re-orthogonalization was needed
    rotated = tmp_path / "rotated.onnx"
    report = convert(OUTLIER, rotated, rotation_file=out, r4=True, validate=True)
    assert report.validation["rel_l2"] < 1e-5
    ids = _ids(1)
    assert _rel(_ort_logits(rotated, ids), _ort_logits(OUTLIER, ids)) < 1e-5


def test_same_seed_same_file_and_resume_continues(tmp_path: Path) -> None:
    straight = _arrays(_learn(tmp_path, "a.npz", steps=4))
    again = _arrays(_learn(tmp_path, "b.npz", steps=4))
    other = _arrays(_learn(tmp_path, "c.npz", steps=4, seed=1))
    _learn(tmp_path, "d.npz", steps=2)
    resumed = _arrays(_learn(tmp_path, "d.npz", steps=4, resume=True))
    for key in straight:
        assert np.array_equal(straight[key], again[key])
        assert np.array_equal(straight[key], resumed[key])
    assert not np.array_equal(straight["R1"], other["R1"])


def test_resume_refuses_other_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _learn(tmp_path, "e.npz", steps=1)
    argv = [*_learn_argv(tmp_path, tmp_path / "e.npz", 2), "--lr", "0.5", "--resume", "--quiet"]
    assert main(argv) == 2
    assert "other options" in capsys.readouterr().err


def test_loss_decreases_on_an_outlier_model(tmp_path: Path) -> None:
    """One fixed window, several steps: the quantized loss goes down from the Hadamard start."""
    tokens = _tokens(tmp_path, 4096 + 32 * 5)  # exactly one training window (and 4 held out)
    config = LearnConfig(
        steps=8, bits="w4a8", block=32, window_len=32, lr=0.002, optimizer="adam", loss="ce", batch=1, save_every=100
    )
    learner = Learner(OUTLIER, np.load(tokens).astype(np.int64), tmp_path / "f.npz", config, threads=1)
    result = learner.run()
    assert len(result.losses) == 8
    assert result.losses[-1] < result.losses[0]
    assert np.mean(result.losses[-3:]) < result.losses[0] - 0.1


def test_cli_refuses_without_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    argv = ["learn", str(OUTLIER), "--tokens", str(_tokens(tmp_path)), "--out", str(tmp_path / "g.npz")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "torch" in err
    assert not (tmp_path / "g.npz").exists()


@pytest.mark.parametrize("channels", [0, 3])
def test_static_fake_quant_is_what_eval_deploys(tmp_path: Path, channels: int) -> None:
    """Calibrated static ranges in torch give the logits of eval's W8A8 QDQ model in onnxruntime: same
    sites (linears' inputs and outputs, both inputs of attention MatMuls), same scales, same rounding;
    with float channels, the same side paths kept float."""
    from spinquant_onnx.integrations.activation_stats import collect_maxima
    from spinquant_onnx.integrations.quantize import keep_float, quantize_w8a8

    rotated, quantized = tmp_path / "rot.onnx", tmp_path / "q.onnx"
    maxima = collect_maxima(OUTLIER, _ids(7, (1, 256)).reshape(-1), sites=("down",), windows=2, window_len=64,
                            offset=0) if channels else None
    convert(OUTLIER, rotated, r2=True, r4=True, rotation="hadamard", float_channels=channels, activation_maxima=maxima)
    side = [n for n in onnx.load(str(rotated)).graph.node if "/float_channels/" in n.name]
    assert len(side) == (8 if channels else 0)  # 2 blocks x (mask, gather, matmul, add)
    model = QuantModel(OUTLIER, scheme("w8a8"), {"r1", "r2"}, r4=True, seed=0, float_channels=channels, maxima=maxima)
    head = [n.name for n in model.graph.nodes if n.name == "/lm_head/MatMul"]
    assert head
    calibration = _ids(5, (2, 16))
    quantize_w8a8(rotated, quantized, calibration, keep_float(onnx.load(str(rotated))) + head)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    ids = _ids(6, (1, 16))
    ref = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    with torch.no_grad():
        static = model.logits(ids, static=model.calibrate(calibration)).numpy()
        dynamic = model.logits(ids).numpy()
    assert _rel(static, ref) < 1e-5
    assert _rel(dynamic, ref) > 1e-3  # per-batch ranges are another function: why held-out uses static ones
    assert _rel(_ort_logits(rotated, ids), ref) > 1e-2  # and the quantizers do change the logits


def test_heldout_loss_is_logged_and_the_best_is_written(tmp_path: Path) -> None:
    tokens = np.load(_tokens(tmp_path)).astype(np.int64)
    config = LearnConfig(steps=4, window_len=32, eval_every=2, save_every=100)
    learner = Learner(OUTLIER, tokens, tmp_path / "h.npz", config, threads=1)
    result = learner.run()
    assert [step for step, _ in result.heldout] == [0, 2, 4]
    assert result.heldout_float is not None and result.heldout_float < result.heldout[0][1]
    best = min(result.heldout, key=lambda item: item[1])
    assert result.written_step == best[0]
    learner.model.rotations.load_state_dict(learner.best)
    assert learner.heldout_loss() == pytest.approx(best[1], rel=1e-6)  # the file holds the best rotations
    written = _arrays(tmp_path / "h.npz")
    for key, matrix in learner.model.rotations.final().items():
        assert np.array_equal(written[key], matrix)
        # the float32 matrices the model computes with are the float64 file's to float32 precision
        assert np.abs(learner.model.rotations.matrices()[key].detach().numpy() - matrix).max() < 1e-5


def test_float_channels_are_learned_around_and_need_rotates_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--float-channels K puts rotate's side paths in the learned graph (test above: the same logits as
    eval's QDQ model); the statistics are rotate's default calibration windows, so a short file is refused."""
    out = tmp_path / "fc.npz"
    argv = [*_learn_argv(tmp_path, out, 1), "--float-channels", "2", "--threads", "1", "--quiet"]
    assert main(argv) == 2
    assert "--float-channels: the token file has 4352 ids" in capsys.readouterr().err
    assert not out.exists()
    tokens = tmp_path / "long.npy"
    np.save(tokens, np.random.default_rng(4).integers(0, 64, 5120).astype(np.int32))
    argv[argv.index("--tokens") + 1] = str(tokens)
    assert main(argv) == 0
    assert set(_arrays(out)) == {"R1", "model.layers.0.self_attn.R2", "model.layers.1.self_attn.R2"}
    rotated = tmp_path / "fc.onnx"
    assert main(["rotate", str(OUTLIER), str(rotated), "--rotation-file", str(out), "--r4", "--calibration",
                 str(tokens), "--float-channels", "2", "--validate"]) == 0
