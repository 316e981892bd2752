#!/usr/bin/env bash
# Everything issue 6 measures on a lent GPU, in one device call: the GPU tests, the search benchmark
# and the whole-tokenizer benchmark, each log and JSON under $OUT (default out/gpu).
#
# The device image has torch, CuPy, torchvision, pyarrow and fsspec but not zstandard (imported by
# the shard reader) nor Ray (not needed here). Before the call, on the dev machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl zstandard
# and name `.whl` in the call's carry. Run from the repository root: bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
# only the files with GPU tests: the others import Ray, which the image lacks
python3 -m pytest -q -m gpu tests/test_fused.py tests/test_search.py 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/search_gpu.py --json "$OUT/search_gpu.json" 2>&1 | tee "$OUT/search_gpu.log"
python3 benchmarks/tokenizer_gpu.py ${SOURCE:+--source "$SOURCE"} --json "$OUT/tokenizer_gpu.json" 2>&1 \
    | tee "$OUT/tokenizer_gpu.log"
