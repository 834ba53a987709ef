#!/usr/bin/env bash
# Runs on the GPU machine (one device call): builds llama.cpp's shared libraries with CUDA
# from the vendored source, checks the install with `kibitz selftest`, writes a full-size
# random-weight MiniCPM-o 4.5 pair, times one commentary cycle with `kibitz bench`, then
# N live streams at once on one engine with `kibitz bench --streams` (batched, split KV,
# and the serial path for comparison). GPU memory is sampled throughout.
#
# Expects, beside the repo (carried, git-ignored):
#   .device/kibitz            built here with: cargo build --release -p kibitz \
#                               --no-default-features --features dynamic-link
#   .device/llama.cpp.tar.xz  llama-cpp-sys-2's vendored llama.cpp, trimmed to
#                               CMakeLists.txt LICENSE cmake ggml include src vendor tools/mtmd
# Writes one log to $OUT/gpu-bench.log.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log="$OUT/gpu-bench.log"
exec > >(tee "$log") 2>&1
repo=$(pwd)
work=/tmp/kibitz-gpu
mkdir -p "$work"

echo "== $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc

echo "== build llama.cpp (CUDA, sm_90, shared)"
t0=$(date +%s)
if [ ! -f "$work/build/bin/libllama.so" ]; then
  tar -xJf "$repo/.device/llama.cpp.tar.xz" -C "$work"
  cmake -S "$work/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_MTMD=ON -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$work/cmake.log"
  # mtmd lives under tools/; with tools off it is added by hand.
  cmake --build "$work/build" -j "$(nproc)" --target llama mtmd > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
fi
echo "built in $(( $(date +%s) - t0 )) s"
libs=$(dirname "$(find "$work/build" -name libllama.so | head -1)")
for l in $(find "$work/build" -name 'lib*.so*' -printf '%h\n' | sort -u); do libs="$libs:$l"; done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
kibitz="$repo/.device/kibitz"
chmod +x "$kibitz"
ldd "$kibitz" | grep -E 'llama|mtmd|ggml|not found' || true

echo "== selftest"
"$kibitz" --log info,llama.cpp=info selftest 2>&1 | grep -vE 'llama.cpp.*(tensor|- kv|type +f)' | tail -40

echo "== full-size model"
"$kibitz" make-test-model --size full --quant Q4_K_M "$work/full"

bench() {
  echo "== bench $*"
  "$kibitz" --log info,llama.cpp=info bench --model "$work/full" --cycles 20 --warmup 3 --json "$@" 2>&1 \
    | grep -E 'offloaded|CLIP using|bench:|^\||^\{|cycles of|ERROR|error' || echo "bench $* failed"
}
streams() {
  echo "== streams $*"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$work/mem.log" 2>/dev/null &
  smi=$!
  "$kibitz" --log warn bench --model "$work/full" --flash-attn on --generate 30 --warmup 4 --json "$@" 2>&1 \
    | grep -vE 'n_ctx_seq|^\s*$' || echo "streams $* failed"
  kill $smi 2>/dev/null || true
  echo "peak GPU memory: $(sort -n "$work/mem.log" | tail -1) MiB"
}
bench --flash-attn on --new-frames 2    # one cycle at a time, live-like frame reuse
streams --streams 1,2,4,8,16,24,32 --seconds 12
streams --streams 8,16 --seconds 12 --kv-split
# streams --streams 1,4,16 --seconds 12 --serial   # measured 2026-11-30 (first run), see docs/benchmarks.md
echo "== done $(date -u +%FT%TZ)"
