#!/usr/bin/env bash
# One call on a lent GPU machine (the README's throughput section has its figures): install what
# its image lacks, run the CUDA tests and the throughput benchmark with --device cuda, and copy
# everything to $OUT.  DEVICE=cpu runs the same steps here, as a dry run.
#
# Prepare here (both folders are git-ignored through .git/info/exclude and travel with `carry`):
#   for p in pyro-ppl==1.9.2 pyro-api==0.1.2 pythae==0.1.2 pydantic==2.14.4 pydantic_core==2.50.5 \
#            annotated-types typing-inspection; do
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"; done
#   mkdir -p .devdata && cp -r ../shared/data/binarized_mnist .devdata/
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/cuda_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
fi
python3 -c "import torch, pyro, pyrovae; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -x tests/test_cuda.py tests/test_capture.py tests/test_training.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT/tests.log"
python3 benchmarks/throughput.py --device "$DEVICE" --data-dir .devdata --rounds 1 --images 500 --eval-images 20 --samples 50 --out smoke > "$OUT/smoke.log" 2>&1 \
    || { tail -30 "$OUT/smoke.log"; exit 1; }
rm -f benchmarks/results/smoke.*
python3 benchmarks/throughput.py --device "$DEVICE" --data-dir .devdata ${THROUGHPUT_ARGS:---rounds 5 --images 20000 --eval-images 10000 --eval-rounds 3 --samples 5000} \
    > "$OUT/throughput.log" 2>&1; echo "throughput rc=$?"
grep -v '^{' "$OUT/throughput.log" | tail -40
cp benchmarks/results/throughput_"$DEVICE".* "$OUT/" 2>/dev/null || true
