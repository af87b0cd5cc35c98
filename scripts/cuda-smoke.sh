#!/usr/bin/env bash
# Checks a CUDA build of runner on a machine without a GPU or CUDA's libraries (CI runs it on
# the build from `cargo build --features cuda`): the binary names no CUDA library as needed,
# so it starts anywhere; it serves on the CPU with --device cpu and under --device auto (and
# `runner doctor` says why auto is the CPU, and that candle's kernels are built in as machine
# code for the GPU the build targets); and
# --device cuda fails in runner's words, naming the missing libraries, instead of the
# dynamic loader refusing to start it or cudarc panicking. Then, with CUDA's libraries and the
# toolkit's link stub standing in for the driver's (a machine with the toolkit but no driver,
# as in a container built without the GPU): --device cuda says the driver's library is the
# stub, --device auto serves on the CPU, and so does runner doctor.
#   scripts/cuda-smoke.sh PATH/TO/runner   (CUDA_ROOT or CUDA_PATH: the toolkit, for the stub)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:?usage: scripts/cuda-smoke.sh PATH/TO/runner (built with --features cuda)}"
MODEL="$ROOT/models/all-minilm-l6-v2"
fail() { echo "cuda-smoke: $*" >&2; exit 1; }
# Whatever this machine has must not hide what the binary itself needs.
unset LD_LIBRARY_PATH

needed="$(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
echo "needed libraries: $needed"
for lib in libcuda libcublas libcurand libcudart libnvrtc; do
  case " $needed" in *" $lib"*) fail "$BIN needs $lib.* to start (candle's cudarc must load it, not link it: vendor/README.md)";; esac
done

version="$("$BIN" --version)" || fail "$BIN --version failed"
echo "$version"
[[ "$version" == *"(cuda"* ]] || fail "expected a CUDA build, got: $version"
# --version names the architecture candle's kernels were built for (CUDA_COMPUTE_CAP, 90
# with ../shared/cuda: sm_90a, arch-specific from 9.0 on), which `runner package` checks
# against the GPU it packages for.
# CUDA_COMPUTE_CAP may list several GPUs (a portable build): the note then starts with the
# lowest, and the PTX is for it too.
caps="${CUDA_COMPUTE_CAP:-90}"
cap="${caps%%,*}"; cap="${cap%a}"
arch="sm_${cap}"; [ "$cap" -ge 90 ] && arch="sm_${cap}a"
if [[ "$caps" == *,* ]]; then
  [[ "$version" == *"+ PTX $arch;"* ]] || fail "--version does not name the portable build's PTX $arch: $version"
fi
[[ "$version" == *"kernels $arch"* ]] || fail "--version does not name the kernels' target $arch: $version"

ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1' && {
  echo "cuda-smoke: this machine has libcuda.so.1; the missing-library checks need a machine without it (skipped)"
  exit 0
}

out="$("$BIN" run "$MODEL" -i text=hello --device cpu -q)" || fail "--device cpu did not predict"
[[ "$out" == *"["* ]] || fail "--device cpu printed no embedding: $out"
out="$("$BIN" run "$MODEL" -i text=hello --device auto 2>&1)" || fail "--device auto did not fall back to the CPU: $out"
[[ "$out" == *"["* ]] || fail "--device auto printed no embedding: $out"

doctor="$("$BIN" doctor "$MODEL" --port 0 2>&1)" || fail "runner doctor found problems: $doctor"
[[ "$doctor" == *"cpu (auto: the NVIDIA driver's CUDA library is not found"* ]] \
  || fail "runner doctor does not say why --device auto is the CPU: $doctor"
# The build assembles candle's kernels into machine code for the GPU it targets
# (CUDA_COMPUTE_CAP, 90 with ../shared/cuda), so an H100/H200 compiles nothing at start.
[[ "$doctor" == *"candle's kernels $arch"*", which run on compute capability"* ]] \
  || fail "runner doctor does not name the kernels' target $arch: $doctor"
[[ "$doctor" == *"as machine code for compute capability ${cap:0:-1}.${cap: -1}"* ]] \
  || fail "runner doctor does not say the build holds candle's kernels as machine code for compute capability $cap: $doctor"

if err="$("$BIN" run "$MODEL" -i text=hello --device cuda 2>&1)"; then
  fail "--device cuda succeeded on a machine without CUDA: $err"
fi
echo "$err" | tail -1
for words in "cannot open the GPU" "the NVIDIA driver's CUDA library is not found" "libcuda.so.1" \
  "cuBLAS (CUDA 13) is not found" "libcublas.so.13" "LD_LIBRARY_PATH" "--device cpu"; do
  [[ "$err" == *"$words"* ]] || fail "the --device cuda error does not say \"$words\": $err"
done
[[ "$err" != *"panicked"* ]] || fail "--device cuda panicked: $err"

toolkit="${CUDA_ROOT:-${CUDA_PATH:-}}"
if [ -z "$toolkit" ] || [ ! -f "$toolkit/lib/stubs/libcuda.so" ]; then
  echo "cuda-smoke: no toolkit with lib/stubs/libcuda.so (CUDA_ROOT, CUDA_PATH): the stub checks are skipped"
  echo "cuda-smoke: ok"
  exit 0
fi
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
ln -s "$toolkit/lib/stubs/libcuda.so" "$stub/libcuda.so.1"
export LD_LIBRARY_PATH="$toolkit/lib:$stub"
if err="$("$BIN" run "$MODEL" -i text=hello --device cuda 2>&1)"; then
  fail "--device cuda succeeded with the toolkit's stub for a driver: $err"
fi
echo "$err" | tail -1
for words in "cannot open the GPU" "$stub/libcuda.so.1 is the CUDA toolkit's link stub" \
  "install the driver" "CUDA_ERROR_STUB_LIBRARY" "--device cpu"; do
  [[ "$err" == *"$words"* ]] || fail "with the stub, the --device cuda error does not say \"$words\": $err"
done
[[ "$err" != *"panicked"* ]] || fail "--device cuda panicked with the stub: $err"
out="$("$BIN" run "$MODEL" -i text=hello --device auto 2>&1)" || fail "--device auto did not fall back to the CPU beside the stub: $out"
[[ "$out" == *"["* && "$out" == *"link stub"* ]] || fail "--device auto beside the stub: no embedding, or no word why: $out"
# The driver initialised on a thread of its own beside cuBLAS's load: the same refusal, the
# same fallback.
err="$(RUNNER_CUDA_PRELOAD=beside-init "$BIN" run "$MODEL" -i text=hello --device cuda 2>&1)" \
  && fail "--device cuda succeeded with the stub under RUNNER_CUDA_PRELOAD=beside-init: $err"
[[ "$err" == *"link stub"* && "$err" == *"CUDA_ERROR_STUB_LIBRARY"* && "$err" != *"panicked"* ]] \
  || fail "under RUNNER_CUDA_PRELOAD=beside-init the stub is not named: $err"
out="$(RUNNER_CUDA_PRELOAD=beside-init "$BIN" run "$MODEL" -i text=hello --device auto 2>&1)" \
  || fail "--device auto did not fall back to the CPU under RUNNER_CUDA_PRELOAD=beside-init: $out"
[[ "$out" == *"["* && "$out" == *"link stub"* ]] || fail "--device auto under beside-init: no embedding, or no word why: $out"
doctor="$("$BIN" doctor "$MODEL" --port 0 2>&1)" || fail "runner doctor found problems beside the stub: $doctor"
[[ "$doctor" == *"cpu (auto: $stub/libcuda.so.1 is the CUDA toolkit's link stub"* ]] \
  || fail "runner doctor does not say the driver's library is the stub: $doctor"
echo "cuda-smoke: ok"
