#!/usr/bin/env bash
# Builds the browser app as users get it, into DIST (default dist/):
# trunk's release build with the `web` cargo profile (Cargo.toml), then
# each page file also as .br (brotli -q 11) and .gz (gzip -9) beside it,
# for a server that sends them with Content-Encoding (the browser test
# serves it so: native-runner/tests/browser.rs). Not wasm-opt: Debian's
# binaryen 108 points wasm-bindgen's externref table export at the funcref
# table, and the page stops at start (DEVELOPERS.md).
# Needs trunk, the matching wasm-bindgen-cli and brotli (.ci/run installs them).
set -euo pipefail
dist=$(realpath -m "${1:-dist}")
cd "$(dirname "$0")/.."
trunk build --offline --release --cargo-profile web --dist "$dist"
# The trainer's decoded size, for the page's download progress
# (app/worker-boot.js: behind Content-Encoding the stream's length is unknown).
printf '{"bytes": %d}\n' "$(stat -c %s "$dist/burnbooth-worker_bg.wasm")" > "$dist/trainer-size.json"
for file in "$dist"/*.wasm "$dist"/*.js "$dist"/*.html "$dist"/*.css; do
  [ -f "$file" ] || continue
  brotli --force --keep --quality=11 "$file"
  gzip --force --keep -9 "$file"
done
ls -l "$dist"
