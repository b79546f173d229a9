#!/usr/bin/env bash
# Latency and throughput of `brittle serve` on loopback against the bare forward time of one
# image, measured in the same run (examples/serve_bench.rs). Usage:
#   bench/serve.sh [MODEL.pt] [DETECTOR_DIR]   (defaults: ../shared/models/resnet_2b.pt, none)
# Extra settings via env: CLIENTS (8), REQUESTS (2000), DURATION (20 s), MAX_WAIT_US (1000 and 0),
# THREADS (model intra-op threads; 0 = half the cores, as `brittle serve`), ARCH (native architecture
# for a safetensors / checkpoint model file, e.g. wrn-28-10), ONE_IMAGE (timed one-image requests per
# body type, 400; lower it for large models).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
model="${1:-../shared/models/resnet_2b.pt}"
det=()
[ -n "${2:-}" ] && det=(--detector "$2")
cargo build --release --locked --example serve_bench
for wait in ${MAX_WAIT_US:-1000 0}; do
  echo "== max wait ${wait} us"
  "${CARGO_TARGET_DIR:-target}/release/examples/serve_bench" --model "$model" "${det[@]}" \
    --clients "${CLIENTS:-8}" --requests "${REQUESTS:-2000}" --seconds "${DURATION:-20}" --max-wait-us "$wait" \
    --threads "${THREADS:-0}" --one-image "${ONE_IMAGE:-400}" ${ARCH:+--arch "$ARCH"}
done
