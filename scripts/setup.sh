#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine needs to build and test kibitz, then makes the
# test media. Safe to run again. Rust itself comes from rustup (https://rustup.rs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

packages=(
  # FFmpeg 5.1 for decoding (ffmpeg-next) and the ffmpeg CLI for test media
  libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev
  libavdevice-dev libavfilter-dev ffmpeg pkg-config
  # bindgen (ffmpeg-sys, llama-cpp-sys) and the bundled C/C++ builds (llama.cpp, libjpeg-turbo)
  clang libclang-dev cmake nasm g++ make
  # the page's browser test
  chromium chromium-driver
  # the default voice, and phonemes for piper voices (run as a program: GPL-3, never linked)
  espeak-ng
  python3 python3-pip
  # scripts/soak.sh's RTSP camera: GStreamer's RTSP server through the system python3
  gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi iproute2 curl
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
"$root/scripts/fixtures.sh"
