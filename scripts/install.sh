#!/usr/bin/env bash
# One coherent environment: spinquant-onnx with its test tools, and the real aimet-onnx for the quantsim tests.
#
# aimet-onnx depends on the `onnxruntime` distribution, which writes the same `onnxruntime/` package as our
# `onnxruntime-gpu`. We pin both to the same version, let aimet have its CPU distribution (so `pip check` is
# clean), then reinstall onnxruntime-gpu's files over it (its files are a superset of the CPU wheel's).
# torch and torchvision are pinned in the same command as aimet-onnx: unpinned, pip would pull torch 2.14 with
# gigabytes of CUDA wheels; torch==2.13.0 is the CPU build this machine keeps on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT=1.31.1
python -m pip install -e ".[test]" "onnxruntime-gpu==${ORT}"
python -m pip install aimet-onnx==2.42.0 "onnxruntime==${ORT}" torch==2.13.0 torchvision==0.28.0
python -m pip install --force-reinstall --no-deps "onnxruntime-gpu==${ORT}"
# Run from elsewhere, so the check sees what an installed import finds (a prior `pip install .` copies the
# package into site-packages; the editable install above must have replaced it).
ROOT="$(pwd)"
(cd / && python -c "import onnxruntime as o, aimet_onnx, spinquant_onnx, pathlib, sys; \
assert 'CUDAExecutionProvider' in o.get_available_providers(), 'CPU onnxruntime files won'; \
here = pathlib.Path(spinquant_onnx.__file__).resolve().parent.parent; \
assert here == pathlib.Path(sys.argv[1]).resolve(), f'spinquant_onnx imported from {here}, not this checkout'; \
print('environment ready: onnxruntime', o.__version__, '; spinquant_onnx from', here)" "$ROOT")
