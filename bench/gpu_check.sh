#!/usr/bin/env bash
# GPU check: on one NVIDIA GPU machine, runs every `gpu`-marked test in under 8 minutes:
# NVML readings against torch, two vLLM engines packed on one GPU inside the ledger,
# sleep and wake timings, memory verified after eviction, pinned host-to-device copy
# bandwidth. Figures are printed (-s). Needs the venv with the `vllm` extra, which
# `make test` (or `make .venv/.installed-test`) builds where a driver is present.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed-test
exec timeout 470 .venv/bin/python -m pytest -q -s -m gpu "$@"
