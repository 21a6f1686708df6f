#!/usr/bin/env bash
# The GPU check, in one go, on a machine with an NVIDIA GPU (about 5-8 minutes on 16 cores):
#   1. make sure mmprep's own dependencies import (mmprep itself runs from this checkout, not installed);
#   2. make sure the gpu extra is there: a CUDA build of torch with the torchvision built for it;
#   3. run the GPU tests (tests/test_gpu_path.py, tests/test_transforms.py: the `cuda` ones and the rest);
#   4. run benchmarks/bench_masks.py (CPU and CUDA) and benchmarks/bench_gpu.py (pack --device cuda against the
#      CPU path and the decode ceilings, and the measured pixel tolerance);
#   5. print one table.
#
#   bash benchmarks/gpu_check.sh
#
# Environment:
#   PY                python with (or to receive) the CUDA torch (default: python3)
#   TORCH_SPEC        torch to install when no CUDA torch + torchvision pair imports, e.g. torch==2.13.0
#   TORCHVISION_SPEC  the torchvision built for it, e.g. torchvision==0.28.0 (pip's index must serve the CUDA
#                     wheels: set PIP_INDEX_URL / PIP_EXTRA_INDEX_URL to PyTorch's CUDA wheel index)
#   WHEELS            a folder of wheels to install missing packages from, without any index (a machine with no
#                     network; fetch them elsewhere with `pip download --no-deps --only-binary=:all:
#                     --python-version 3.12 NAME -d WHEELS_DIR`)
#   SAMPLES           corpus samples for bench_gpu.py (default 1000, ~2,250 images)
#   OUT_DIR           where logs and JSON go (default .bench/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${OUT_DIR:-.bench/gpu-check}
SAMPLES=${SAMPLES:-1000}
NPROC=$(nproc 2>/dev/null || echo 4)
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMPREP_NO_PROGRESS=1 PYTHONUNBUFFERED=1
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

step "1/5 mmprep's dependencies"
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"typer": "typer", "rich": "rich", "PIL": "pillow", "numpy": "numpy", "pyarrow": "pyarrow", "tqdm": "tqdm",
        "transformers": "transformers", "tokenizers": "tokenizers", "jinja2": "jinja2", "fsspec": "fsspec",
        "psutil": "psutil", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
  echo "installing: $missing"
  if [[ -n "${WHEELS:-}" ]]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing
  else
    # shellcheck disable=SC2086
    "$PY" -m pip install -q $missing
  fi
fi
"$PY" -c "import mmprep.cli, mmprep.images.gpu; print('mmprep imports')"

step "2/5 the gpu extra (torch + torchvision with CUDA)"
gpu_ok() {
  "$PY" - <<'EOF'
import sys
from mmprep.images.gpu import gpu_problem
problem = gpu_problem()
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})", end="")
try:
    import torchvision
    print(f", torchvision {torchvision.__version__}", end="")
except Exception:
    pass
print(f": {'ready' if problem is None else problem}")
sys.exit(0 if problem is None else 1)
EOF
}
if ! gpu_ok; then
  if [[ -z "${TORCH_SPEC:-}" || -z "${TORCHVISION_SPEC:-}" ]]; then
    echo "no usable CUDA torch + torchvision pair; set TORCH_SPEC and TORCHVISION_SPEC to a matching pair" >&2
    exit 2
  fi
  "$PY" -m pip install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
  gpu_ok
fi

step "3/5 GPU tests"
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_path.py tests/test_transforms.py 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
"$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu_path.py tests/test_transforms.py \
  2>&1 | tail -1 > "$OUT_DIR/cuda_tests.txt" || true

step "4/5 benchmarks"
"$PY" benchmarks/bench_masks.py --json "$OUT_DIR/masks.json" | tee "$OUT_DIR/masks.log"
"$PY" benchmarks/bench_gpu.py --samples "$SAMPLES" --workers "$NPROC" --cuda-workers "1,4,$NPROC" --repeats 2 \
  --json "$OUT_DIR/gpu.json" | tee "$OUT_DIR/gpu.log"

step "5/5 summary"
"$PY" - "$OUT_DIR" "$tests_rc" <<'EOF'
import json, sys
from pathlib import Path
out, tests_rc = Path(sys.argv[1]), int(sys.argv[2])
masks = json.loads((out / "masks.json").read_text())
gpu = json.loads((out / "gpu.json").read_text())
tests = (out / "tests.log").read_text().strip().splitlines()[-1]
cuda_tests = (out / "cuda_tests.txt").read_text().strip()
print(f"GPU: {gpu['gpu'] or 'none'}  |  tests: {tests} (exit {tests_rc})  |  cuda-marked: {cuda_tests}")
print()
print("| what | device | images/s | ratio | against |")
print("|---|---|---|---|---|")
for r in masks["results"]:
    if r["method"] != "loop":
        print(f"| masks {r['method']} ({r['pixels']}) | {r['device']} | {r['images_per_s']:,.0f} | "
              f"{r['speedup_vs_loop']:.2f} | per-sample loop, same device |")
res = gpu["results"]
for name, r in res.items():
    print(f"| {name} | {'cuda' if 'cuda' in name or name in ('nvjpeg ceiling', 'device path') else 'cpu'} | "
          f"{r['images_per_s']:,.0f} | {r['images_per_s'] / res['ceiling']['images_per_s']:.2f} | Pillow decode "
          "ceiling |")
tol = gpu.get("tolerance")
if tol:
    print(f"\npixels, pack cuda vs pack cpu: mean |diff| {tol['mean_of_means']:.3f} (max per image "
          f"{tol['max_mean']:.2f}), 99th percentile max {tol['max_p99']:.0f}, {tol['identical_images']}/"
          f"{tol['images']} images identical")
EOF
echo "done in $(( $(date +%s) - t0 ))s; logs in $OUT_DIR"
exit "$tests_rc"
