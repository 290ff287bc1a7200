#!/usr/bin/env bash
# The GPU benchmark (issue 15, DEVELOPERS.md "The GPU benchmark"): on a lent
# GPU machine, for SD 1.5 at 512 px and SDXL at 1024 px (random weights, LoRA
# rank 16 on attention, batch 1, gradient checkpointing, frozen base in f16),
# Burnbooth's LoRA step time and GPU memory (bench-train on wgpu over Vulkan)
# next to PyTorch diffusers' on the same GPU (fp16 base and autocast, as
# diffusers' train_dreambooth_lora scripts train with --mixed_precision fp16).
#
# That machine has PyTorch, peft and transformers but no Rust, no diffusers,
# maybe no Vulkan loader, and no network: everything else travels in
# .gpu-bench/ (ignored by git, carried by the device tool).
#
#   scripts/gpu-bench.sh prepare   here: builds a stripped release bench-train
#                                  (xz-compressed: 61 MB becomes 9.5 MB), zips
#                                  the installed diffusers, downloads the
#                                  Vulkan loader .deb, all into .gpu-bench/
#   scripts/gpu-bench.sh smoke     here: the same commands on the CPU at toy
#                                  sizes (the tiny SD1 and SDXL fixtures)
#   bash scripts/gpu-bench.sh run  there: device `run` with carry [".gpu-bench"]
#                                  and timeout_s 540; prints one table
#
# PYTHON names the Python with torch, diffusers and peft for prepare and
# smoke (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
pack=.gpu-bench
python="${PYTHON:-python3}"

# bench-train runs `python3 scripts/bench_train_torch.py`: put $PYTHON first
# (a wrapper, not a link: a virtual environment's python finds its packages
# from its own path).
use_python() {
  local bin
  bin="$(mktemp -d)"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v "$python")" > "$bin/python3"
  chmod +x "$bin/python3"
  export PATH="$bin:$PATH"
}

case "$mode" in
prepare)
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/burnbooth-target}"
  mkdir -p "$pack/debs"
  echo "==> release bench-train (long on a small machine: the whole dependency tree at release)"
  cargo build --release --locked -p native-runner --bin bench-train
  cp "$CARGO_TARGET_DIR/release/bench-train" "$pack/bench-train"
  strip "$pack/bench-train"
  # The repository travels too (37 MiB of fixtures and the example model on 2026-12-03): 64 MiB in all.
  xz -9 -T2 -f "$pack/bench-train"
  echo "==> diffusers from $python, zipped (Python imports it from the zip)"
  "$python" - "$pack/diffusers.zip" <<'PY'
import pathlib, sys, zipfile
import diffusers
root = pathlib.Path(diffusers.__file__).parent
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".json", ".txt"):
            z.write(path, "diffusers/" + str(path.relative_to(root)))
print("diffusers", diffusers.__version__)
PY
  echo "==> the Vulkan loader (libvulkan1, amd64)"
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gpu-bench-apt-lists'
  mkdir -p /tmp/gpu-bench-apt-lists/partial
  # shellcheck disable=SC2086
  (apt-get $o update -qq && cd "$pack/debs" && apt-get $o download libvulkan1) ||
    echo "warning: could not download libvulkan1; the GPU machine must have a Vulkan loader"
  du -sh "$pack"/* "$pack"
  size=$(du -sm "$pack" | cut -f1)
  tracked=$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1)
  [ $((size + tracked)) -lt 62 ] || { echo "$pack (${size} MiB) and the repository (${tracked} MiB) pass the device tool's 64 MiB"; exit 1; }
  echo "ready: device run with carry [\"$pack\"]: bash scripts/gpu-bench.sh run"
  ;;
smoke)
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/burnbooth-target}"
  cargo build --locked -p native-runner --bin bench-train
  use_python
  for fixture in sd1 sdxl; do
    output="$("$CARGO_TARGET_DIR/debug/bench-train" --device cpu --unet-config "trainer-core/tests/fixtures/models/$fixture/diffusers/unet/config.json" \
      --resolution 64 --rank 4 --checkpointing --f16-base --steps 1 --with-torch 2>&1)"
    echo "$output"
    grep -q 'PyTorch (CPU).*LoRA step' <<<"$output" && grep -q 'burn flex: LoRA step' <<<"$output" ||
      { echo "smoke: $fixture did not report both sides"; exit 1; }
  done
  echo "smoke: both sides ran for the SD1 and SDXL fixtures' UNets"
  ;;
run)
  started=$SECONDS
  # Python is there for certain; xz may not be.
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$pack/bench-train.xz" /tmp/bench-train || exit 1
  chmod +x /tmp/bench-train
  if ! ldconfig -p | grep -q 'libvulkan.so.1'; then
    for f in "$pack"/debs/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$nvidia_icd" ] && export VK_DRIVER_FILES="$nvidia_icd"
  export PYTHONPATH="$PWD/$pack/diffusers.zip${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  log="${OUT:-/tmp}/gpu-bench.log"
  {
    echo "== $(date -u +%FT%TZ) scripts/gpu-bench.sh on $(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, diffusers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| peft", peft.__version__)'
    # Each case within its time: PyTorch runs first, so its figures stand if ours runs out.
    for case in "sd15 512 200" "sdxl 1024 280"; do
      set -- $case
      echo "== $1 at $2 px: LoRA rank 16 on attention, batch 1, gradient checkpointing, f16 base"
      timeout "$3" /tmp/bench-train --device gpu --unet "$1" --resolution "$2" --rank 16 --checkpointing --f16-base --steps 3 --with-torch ||
        echo "(ended with status $? after at most $3 s)"
    done
    echo "== done in $((SECONDS - started)) s"
  } 2>&1 | tee "$log"
  ;;
*)
  echo "usage: scripts/gpu-bench.sh prepare|smoke|run (see the comments at its top)" >&2
  exit 2
  ;;
esac
