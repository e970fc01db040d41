#!/usr/bin/env bash
# The benchmark table with the state on the GPU: device-to-host staging, pinned regions.
# Run from anywhere on a CUDA machine; extra arguments go to bench_save.py and override these
# defaults (later options win), e.g.  bench/run_cuda.sh --scale 0.05 --repeats 2
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi
exec "$python" bench/bench_save.py --device cuda --scale 1 --repeats 5 --json bench/results/cuda.json "$@"
