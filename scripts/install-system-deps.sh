#!/usr/bin/env bash
# System packages the tests need: an aarch64 cross compiler (ARM artifacts), qemu-user (runs them), PoCL
# (a real OpenCL runtime for the GPU kernels), cmake (C++ example), wordnet-base (WordNet glosses: MiniLM
# calibration and distillation text, models/data.py). Installs only what is missing.
# With arguments, only those packages (make demo: just the cross compiler for the Raspberry Pi artifact).
set -euo pipefail
pkgs=(g++-aarch64-linux-gnu qemu-user pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev clinfo cmake wordnet-base)
[ $# -gt 0 ] && pkgs=("$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing: ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
