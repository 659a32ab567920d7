#!/usr/bin/env bash
# Replays the shared anchor workload (../shared/bench by default) against a release build and
# prints Tally's figures next to the reference systems'. Takes ~25 min the first time (release
# build, data generation), a few minutes after. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED_BENCH=${SHARED_BENCH:-../shared/bench}
WORK=${BENCH_WORK:-target/bench}
[ -f "$SHARED_BENCH/gen_workload.py" ] || { echo "no workload generator at $SHARED_BENCH (set SHARED_BENCH)" >&2; exit 1; }
python3 -c "import numpy, pyarrow, psutil, cramjam" 2>/dev/null || python3 -m pip install -q numpy pyarrow psutil cramjam
mkdir -p "$WORK/workload" "$WORK/run"
if [ ! -f "$WORK/workload/metrics_long.parquet" ]; then
    echo "generating the workload (deterministic, seed 42)..."
    python3 "$SHARED_BENCH/gen_workload.py" --out "$WORK/workload" --formats manifest,parquet
fi
if [ ! -f "$WORK/workload/rw_sps1.bin" ]; then
    echo "generating the remote_write bodies (deterministic, seed 42)..."
    python3 "$SHARED_BENCH/gen_workload.py" --out "$WORK/workload" --formats rw --rw-sps 1
fi
cargo build --release --locked --bin tally
python3 bench/tally_bench.py --binary target/release/tally --workload "$WORK/workload" --run "$WORK/run" "$@"
