#!/usr/bin/env bash
# Do two native-runner builds export the same files? Runs the README's tiny
# LoRA run (3 steps) and a 2-step full fine-tune of the SD1 fixture with each
# binary on the CPU backend, then compares every exported .safetensors file:
# header content (names, shapes, offsets, metadata) and data bytes.
#   scripts/compare_exports.sh OLD_NATIVE_RUNNER NEW_NATIVE_RUNNER
# Used for refactors that must not change exports (docs: DEVELOPERS.md).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/burnbooth-xdg}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

run() { # binary, output folder
  local bin=$1 out=$2
  mkdir -p "$out"
  cp -r "$repo/examples/dreambooth/subject" "$repo/examples/dreambooth/regularisation" "$repo/examples/dreambooth/multidatabackend-tiny.json" "$out/"
  sed "s|^MODEL_NAME=.*|MODEL_NAME=$repo/trainer-core/tests/fixtures/models/sd1/diffusers|" "$repo/examples/dreambooth/tiny.env" > "$out/lora.env"
  sed 's/^MODEL_TYPE=lora/MODEL_TYPE=full/' "$out/lora.env" > "$out/full.env"
  (cd "$out" && "$bin" train --config lora.env --device cpu --max-steps 3 --output-name export --output-dir "$out/lora" > lora.log 2>&1)
  (cd "$out" && "$bin" train --config full.env --device cpu --max-steps 2 --output-name export --output-dir "$out/full" > full.log 2>&1)
}
run "$(realpath "$1")" "$work/a"
run "$(realpath "$2")" "$work/b"
python3 - "$work/a" "$work/b" <<'PY'
import json, os, struct, sys
a, b = sys.argv[1:3]
def parts(path):
    data = open(path, 'rb').read()
    n = struct.unpack('<Q', data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]
files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs
               if f.endswith('.safetensors') and '/checkpoints/' not in os.path.join(d, f) and '/cache/' not in os.path.join(d, f))
same = True
for f in files:
    (ha, da), (hb, db) = parts(os.path.join(a, f)), parts(os.path.join(b, f))
    equal = ha == hb and da == db
    same &= equal
    print(f"{'same' if equal else 'DIFFERENT'}  {f}  ({len(da)} data bytes)")
print('every export has the same content' if same else 'exports differ')
sys.exit(0 if same else 1)
PY
