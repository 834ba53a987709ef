# syntax=docker/dockerfile:1
# kibitz on Debian 12, CPU only: `docker build -t kibitz .` (docs/deploy.md says how to run
# it; Dockerfile.cuda is the NVIDIA build). The build stage has Debian's FFmpeg 5.1 headers
# and the C/C++ tools that llama.cpp, libjpeg-turbo and SQLite are built with; the runtime
# stage has only the shared libraries the binary links, espeak-ng for the default voice and
# CA certificates for model downloads.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev \
      libavdevice-dev libavfilter-dev pkg-config \
      clang libclang-dev cmake nasm g++ make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target folders are cache mounts, so a rebuild after a source change
# compiles only what changed; the binary is copied out of the cache in the same step.
# Only the CPU features: Dockerfile.cuda adds `cuda`. No `target-cpu=native`, so
# llama-cpp-sys-2 builds llama.cpp with GGML_NATIVE=OFF and the image runs on another x86-64
# machine than the one that built it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kibitz \
 && install -m 0755 target/release/kibitz /usr/local/bin/kibitz

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 \
      libavdevice59 libavfilter8 libgomp1 libstdc++6 \
      espeak-ng ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed uid so volume owners match across rebuilds; `video` for /dev/videoN cameras.
RUN useradd --system --uid 10001 --create-home --home-dir /home/kibitz \
      --groups video --shell /usr/sbin/nologin kibitz \
 && mkdir -p /data/models /data/history /data/state /data/media \
 && chown -R kibitz:kibitz /data
COPY --from=build /usr/local/bin/kibitz /usr/local/bin/kibitz
# Every flag is also an environment variable (README): these put the model cache, the
# history and the streams kept across restarts on volumes, and listen beyond the container.
# Beyond loopback kibitz wants KIBITZ_TOKEN (or ALLOW_NO_TOKEN=1): give it at `docker run`.
ENV BIND=0.0.0.0:8199 \
    KIBITZ_CACHE=/data/models \
    HISTORY=/data/history/history.sqlite \
    STATE_DIR=/data/state \
    MEDIA_DIR=/data/media
VOLUME ["/data/models", "/data/history", "/data/state"]
USER kibitz
WORKDIR /home/kibitz
# 8199/tcp: the page, the API, MJPEG, SSE/WebSocket, speech. 8199/udp: WebRTC media.
EXPOSE 8199/tcp 8199/udp
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["kibitz", "healthcheck"]
ENTRYPOINT ["kibitz"]
CMD ["serve"]
