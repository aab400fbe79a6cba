"""``learn``: optimize R1 (and per-layer R2) on the model's own graph, and write a rotation file.

Each step draws ``batch`` windows of calibration tokens (which ones depends only on the seed and the step
number, so a resumed run sees what an uninterrupted one would), runs the fake-quantized rotated model,
and takes one optimizer step on the Cayley parameters (SGD with momentum, as SpinQuant's Cayley SGD; or
Adam). Per-step losses are of different windows, so progress is judged on a fixed held-out set scored as
``eval`` deploys the model: activation ranges calibrated (MinMax, float model) on held-out calibration
windows, then the quantized cross-entropy of other held-out windows under those static ranges. It is
measured at the start (the Hadamard) and every ``eval_every`` steps; the rotations with the lowest
held-out loss are the ones written (so the file is never worse there than the start). A checkpoint
(``OUT.ckpt``) is written every ``save_every`` steps and at the end; ``--resume`` continues from it. The
output is an ``.npz`` with SpinQuant's keys (``R1``, ``model.layers.N.self_attn.R2``) in float64, which
``rotate --rotation-file`` checks and applies.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spinquant_onnx.errors import InputError
from spinquant_onnx.integrations.learn.config import LearnConfig
from spinquant_onnx.integrations.learn.model import QuantModel
from spinquant_onnx.integrations.learn.quantizers import scheme

Log = Callable[[str], None]


@dataclass
class LearnResult:
    out: str
    steps: int
    losses: list[float] = field(default_factory=list)
    float_loss: float | None = None
    heldout: list[tuple[int, float]] = field(default_factory=list)
    heldout_float: float | None = None
    written_step: int = 0
    seconds: float = 0.0
    seconds_per_step: float | None = None
    threads: int = 1
    start_kinds: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_windows(tokens: np.ndarray, config: LearnConfig) -> np.ndarray:
    """Windows of ``window_len`` tokens after the first ``offset`` (eval scores the start of the file)."""
    usable = tokens[config.offset :]
    count = usable.size // config.window_len
    if count < 1 + config.held_out():
        raise InputError(
            f"token array has {tokens.size} ids: after --offset {config.offset} there are {count} windows of "
            f"{config.window_len}, and {config.held_out()} are held out (--eval-windows, --calibration-windows) "
            "with at least one left to train on; pass a longer file or a smaller --offset / --window-len"
        )
    return usable[: count * config.window_len].reshape(count, config.window_len)


def split_held_out(windows: np.ndarray, config: LearnConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training, held-out calibration, held-out scored) windows: the held-out ones are the last, never
    drawn for a step."""
    train = len(windows) - config.held_out()
    return (
        windows[:train],
        windows[train : train + config.calibration_windows],
        windows[train + config.calibration_windows :],
    )


def batch_for(windows: np.ndarray, config: LearnConfig, step: int) -> np.ndarray:
    """The windows of one step: a function of (seed, step) only, so resuming changes nothing."""
    rng = np.random.default_rng([config.seed, step])
    picked = rng.choice(len(windows), size=config.batch, replace=len(windows) < config.batch)
    return windows[np.sort(picked)]


def fingerprint(path: Path) -> str:
    """Size and a hash of the model file's head: enough to refuse a checkpoint of another model."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
    return f"{path.stat().st_size}:{hashlib.sha256(head).hexdigest()[:16]}"


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def _save_atomic(save: Callable[[Path], None], target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        save(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_rotations(matrices: dict[str, np.ndarray], out: Path) -> None:
    """The rotation file, written atomically (``np.savez`` to a hidden name, then renamed)."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **matrices)

    _save_atomic(save, out)


class Learner:
    """One learning run: the model, its optimizer, and where it stands."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokens: np.ndarray,
        out: str | os.PathLike,
        config: LearnConfig,
        threads: int | None = None,
    ):
        self.path, self.out, self.config = Path(model_path), Path(out), config
        if self.out.suffix != ".npz":
            raise InputError(f"{self.out}: the rotation file must end in .npz")
        if not self.out.parent.is_dir():
            raise InputError(f"{self.out.parent}: no such folder for the output")
        self.threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        torch.manual_seed(config.seed)
        windows = training_windows(tokens, config)
        self.windows, self.calibration, self.scored = split_held_out(windows, config)
        self.model = QuantModel(
            self.path,
            scheme(config.bits, config.block),
            set(config.rotations),
            config.r4,
            config.seed,
            config.float_channels,
            self._maxima(tokens) if config.float_channels else None,
        )
        self._check_vocab(windows)
        params = [p for p in self.model.rotations.params if p.requires_grad]
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=config.lr)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        self.step = 0
        self.losses: list[float] = []
        self.heldout: list[tuple[int, float]] = []
        self.best: dict[str, torch.Tensor] = self._params()
        self.step_seconds: list[float] = []
        kept = {k: v for k, v in asdict(config).items() if k not in ("steps", "save_every")}  # may change on resume
        self.meta = _plain({"model": fingerprint(self.path), "config": kept})

    def _maxima(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """down_proj's input statistics as ``rotate --calibration`` measures them (its default windows of the
        same token file), so the float channels learned around are the ones ``rotate`` will split off."""
        from spinquant_onnx.integrations.activation_stats import collect_maxima

        return collect_maxima(
            self.path,
            tokens,
            sites=("down",),
            asked_by="--float-channels",
            advice="the windows `rotate --calibration` measures by default; pass a longer token file",
        )

    def _check_vocab(self, windows: np.ndarray) -> None:
        vocab = self.model.vocab_size
        if vocab is not None and int(windows.max()) >= vocab:
            raise InputError(f"token id {int(windows.max())} is outside the model's vocabulary of {vocab}")

    def _params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.rotations.state_dict().items()}

    # ---------------------------------------------------------------------------------------- checkpoint

    def save_checkpoint(self) -> None:
        state = {
            "meta": self.meta,
            "step": self.step,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "heldout": torch.tensor(self.heldout, dtype=torch.float64).reshape(-1, 2),
            "best": self.best,
            "params": self.model.rotations.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        _save_atomic(lambda tmp: torch.save(state, tmp), _checkpoint_path(self.out))

    def resume(self) -> None:
        path = _checkpoint_path(self.out)
        if not path.is_file():
            raise InputError(f"{path}: no checkpoint to resume from (run without --resume first)")
        state = torch.load(path, weights_only=True)
        if state["meta"] != self.meta:
            raise InputError(
                f"{path}: checkpoint was made for another model or other options; "
                "rerun without --resume, or with the same options"
            )
        self.model.rotations.load_state_dict(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"]]
        self.heldout = [(int(s), float(v)) for s, v in state["heldout"].tolist()]
        self.best = state["best"]

    # ------------------------------------------------------------------------------------------- run

    def float_loss(self) -> float:
        """The float model's loss on step 0's windows: the floor a quantized loss is measured against."""
        with torch.no_grad():
            return float(self.model.loss(batch_for(self.windows, self.config, 0), quantize=False))

    def heldout_loss(self, quantize: bool = True) -> float:
        """Cross-entropy on the held-out scored windows, quantized as ``eval`` deploys: static activation
        ranges calibrated on the held-out calibration windows under the current rotations."""
        with torch.no_grad():
            if not quantize:
                return float(self.model.loss(self.scored, quantize=False))
            weights = self.model.weights(self.model.rotations.matrices())
            ranges = self.model.calibrate(self.calibration, weights)
            return float(self.model.loss(self.scored, static=ranges, weights=weights))

    def evaluate(self) -> float:
        """Score the held-out set now, and keep these rotations if they are the best so far."""
        value = self.heldout_loss()
        if not self.heldout or value < min(v for _, v in self.heldout):
            self.best = self._params()
        self.heldout.append((self.step, value))
        return value

    def _report(self, say: Log, heldout_float: float) -> None:
        value = self.evaluate()
        best = min(v for _, v in self.heldout)
        say(
            f"held-out at step {self.step}: quantized {value:.4f} (best {best:.4f} at step {self.best_step()}, "
            f"float {heldout_float:.4f})"
        )

    def best_step(self) -> int:
        return min(self.heldout, key=lambda item: item[1])[0] if self.heldout else self.step

    def written_step(self) -> int:
        return self.best_step() if self.config.keep == "best" else self.step

    def train_step(self) -> float:
        windows = batch_for(self.windows, self.config, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model.loss(windows, kind=self.config.loss)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InputError(f"learn: loss became {value} at step {self.step}; lower --lr")
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.losses.append(value)
        return value

    def run(self, log: Log | None = None, progress: bool | None = None) -> LearnResult:
        started = time.perf_counter()
        say = log or (lambda _: None)
        config = self.config
        floor = self.float_loss()
        heldout_float = self.heldout_loss(quantize=False)
        say(
            f"learn: {self.path.name}, {config.bits}, rotations {','.join(config.rotations)}"
            f"{' + fixed R4' if config.r4 else ''}, {len(self.windows)} training windows of {config.window_len} "
            f"(+{config.held_out()} held out), {config.batch} per step, {config.optimizer} lr {config.lr}, "
            f"{config.loss} loss, {self.threads} threads; float loss {floor:.4f}, held-out float {heldout_float:.4f}"
        )
        if not self.heldout:
            say(f"held-out at step 0 (start): quantized {self.evaluate():.4f}")
        bar = _bar(config.steps, self.step, progress)
        try:
            while self.step < config.steps:
                tick = time.perf_counter()
                loss = self.train_step()
                self.step_seconds.append(time.perf_counter() - tick)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)
                else:
                    say(f"step {self.step}/{config.steps}: loss {loss:.4f} ({self.step_seconds[-1]:.1f}s)")
                if self.step % config.eval_every == 0:
                    self._report(say, heldout_float)
                if self.step % config.save_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        if self.heldout[-1][0] != self.step:  # the last step is a candidate too, but not kept in the
            self._report(say, heldout_float)  # checkpoint: a resumed run sees only the every-k ones
        current = self._params()
        if config.keep == "best":
            self.model.rotations.load_state_dict(self.best)
        write_rotations(self.model.rotations.final(), self.out)
        self.model.rotations.load_state_dict(current)
        per_step = round(float(np.median(self.step_seconds)), 2) if self.step_seconds else None
        return LearnResult(
            str(self.out),
            self.step,
            list(self.losses),
            floor,
            list(self.heldout),
            heldout_float,
            self.written_step(),
            round(time.perf_counter() - started, 2),
            per_step,
            self.threads,
            dict(self.model.learning.start_kinds),
        )


def _plain(value: Any) -> Any:
    """The metadata as torch.load returns it (tuples come back as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _bar(total: int, done: int, progress: bool | None) -> Any:
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="learn", unit="step", file=sys.stderr)
