#!/bin/sh
# GPU readiness without a GPU: compile every representative generated kernel for sm_90 at every autotune
# config and fail on spills, loops without wgmma, or wait_group 0 in 3+ stage pipelines (about 2 minutes).
# The suite's tests/codegen/test_sm90_readiness.py compiles the quick subset.
set -e
cd "$(dirname "$0")/.."
env -u TRITON_INTERPRET "${PYTHON:-python}" -m attncc.codegen.readiness "$@"
