#!/usr/bin/env bash
# GPU check, on one NVIDIA GPU machine, in under 9 minutes:
# 1. every `gpu`-marked test: NVML readings against torch, two vLLM engines packed on
#    one GPU inside the ledger, sleep and wake timings, memory verified after eviction,
#    pinned host-to-device copy bandwidth, offload to pinned memory and back;
# 2. bench/gpu_tier.py: swap-in from the host-RAM tier in GB/s against a plain pinned
#    copy of the same bytes, and two demo models swapping through the tier on one GPU.
# Figures are printed. Uses the venv if there is one (`make test` builds it where a
# driver and a package index are present), else the machine's python3; it installs
# nothing, and skips with a message whatever that python cannot import.
set -uo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=$(command -v python3)
status=0
if "$python" -c "import pytest" 2>/dev/null; then
    timeout 420 "$python" -m pytest -q -s -m gpu "$@" || status=$?
else
    echo "skipped the gpu-marked tests: $python cannot import pytest"
fi
timeout 120 "$python" bench/gpu_tier.py || status=$?
exit "$status"
