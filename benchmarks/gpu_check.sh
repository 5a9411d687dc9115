#!/usr/bin/env bash
# The CUDA checks, in a few minutes on one GPU: clustering, both EMoE executors and the MIGU
# statistics on CUDA against CPU (tests/test_devices.py and the CUDA test of the clustering), then
# the executor and clustering benchmarks on the GPU, their JSON written to benchmarks/results/*_cuda.json.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU and a CUDA build of torch
#
# It stops with a clear message (exit 2) where there is no GPU: every test it runs also runs on CPU
# in the normal test suite, so a CPU-only machine has nothing more to check here.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_check: torch is not installed in this Python")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}): nothing to check here")
print(f"gpu_check: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
PY
python -c "import modulart" 2>/dev/null || pip install -q --no-deps -e .
echo "--- device tests (CPU and CUDA variants; none may be skipped for want of CUDA)"
python -m pytest -q -p no:cacheprovider -rs tests/test_devices.py tests/test_emoe_cluster.py -k "device or cuda"
echo "--- EMoE executors on CUDA (the CPU benchmark's full setting; curves skipped)"
python benchmarks/emoe_executors.py --device cuda --no-curves --out benchmarks/results/emoe_executors_cuda.json
echo "--- balanced k-means on CUDA"
python benchmarks/emoe_clustering.py --device cuda --no-curves --out benchmarks/results/emoe_clustering_cuda.json
echo "gpu_check passed"
