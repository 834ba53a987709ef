#!/usr/bin/env bash
# Builds the CPU image from `Dockerfile`, unchanged, where no image registry is reachable
# (only Debian's package mirrors), then runs `kibitz selftest` and `kibitz healthcheck` in it.
#
# The two base images the Dockerfile names are made here as local stand-ins:
# - `debian:bookworm-slim`: `debootstrap --variant=minbase bookworm`, docs and apt lists
#   removed as the official slim image does, imported with `buildah from scratch`;
# - `rust:1-bookworm`: that plus the C toolchain, git and curl (what buildpack-deps adds)
#   and this machine's default Rust toolchain under /usr/local/{rustup,cargo}, with the
#   official image's RUSTUP_HOME, CARGO_HOME and PATH, and this machine's CA bundle (so a
#   TLS-intercepting proxy in front of crates.io is trusted as it is here).
# Then `buildah bud --format docker --isolation chroot` (docker format keeps HEALTHCHECK;
# chroot isolation is what works on machines where `podman run` does not) builds the image
# `localhost/kibitz:check`, and `buildah run` runs the checks inside it as its own user.
#
# Needs root, buildah and debootstrap (apt-get install buildah debootstrap). The build is a
# cold release build: run it under `nice -n 19` on a shared machine. Times, the image size
# and the checks' output go to stdout; `KEEP=1` keeps the image and containers.
#
# A quicker check while a cold build would take long: `KIBITZ_BIN=target/debug/kibitz
# scripts/container-check.sh` builds only the Dockerfile's runtime stage (taken from the
# Dockerfile as it is, its one `COPY --from=build` pointed at that binary instead) and runs
# the same checks in it. That checks the runtime packages, the user, the settings and the
# health check, not the build stage; the full run is the one that counts.
#
# Usage: scripts/container-check.sh [WORKDIR]   (default /var/tmp/kibitz-container-check)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-/var/tmp/kibitz-container-check}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
image="localhost/kibitz:check"
mkdir -p "$work"

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "container-check: $tool not found (apt-get install buildah debootstrap)" >&2; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { echo "container-check: run as root (debootstrap, buildah mount)" >&2; exit 1; }

stamp() { date -u +%H:%M:%S; }
has_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# debian:bookworm-slim from a debootstrapped folder.
make_slim() {
  has_image localhost/debian:bookworm-slim && { echo "$(stamp) debian:bookworm-slim: present"; return; }
  local rootfs="$work/rootfs"
  if [[ ! -x "$rootfs/usr/bin/apt-get" ]]; then
    echo "$(stamp) debootstrap bookworm -> $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  fi
  # What the official slim image leaves out, and its sources (updates and security too).
  rm -rf "$rootfs"/usr/share/{doc,man,info}/* "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
  local ctr mnt
  ctr=$(buildah from scratch)
  mnt=$(buildah mount "$ctr")
  cp -a "$rootfs/." "$mnt/"
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash "$ctr"
  buildah commit -q "$ctr" localhost/debian:bookworm-slim >/dev/null
  buildah rm "$ctr" >/dev/null
  echo "$(stamp) debian:bookworm-slim: made"
}

# rust:1-bookworm: the slim stand-in, build tools, and this machine's default toolchain.
make_rust() {
  has_image localhost/rust:1-bookworm && { echo "$(stamp) rust:1-bookworm: present"; return; }
  local rustup_home="${RUSTUP_HOME:-$HOME/.rustup}" cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  local toolchain
  toolchain=$(rustup default | cut -d' ' -f1)
  [[ -d "$rustup_home/toolchains/$toolchain" ]] || { echo "container-check: no toolchain $toolchain in $rustup_home" >&2; exit 1; }
  local ctr
  ctr=$(buildah from --pull=never localhost/debian:bookworm-slim)
  buildah run --isolation chroot "$ctr" -- sh -c 'apt-get update -q >/dev/null \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       gcc g++ libc6-dev make git curl ca-certificates pkg-config >/dev/null \
    && rm -rf /var/lib/apt/lists/*'
  buildah copy -q "$ctr" "$rustup_home/toolchains/$toolchain" "/usr/local/rustup/toolchains/$toolchain" >/dev/null
  buildah copy -q "$ctr" "$cargo_home/bin/rustup" /usr/local/cargo/bin/rustup >/dev/null
  # This machine's trust store: where crates.io is reached through a TLS-intercepting proxy,
  # its CA is in the host's bundle only, and the build stage downloads crates.
  buildah copy -q "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
  # rustup's proxies are the rustup binary under other names, as in the official image.
  buildah run --isolation chroot "$ctr" -- sh -c "set -e; cd /usr/local/cargo/bin; \
    for p in cargo rustc rustdoc cargo-clippy clippy-driver cargo-fmt rustfmt; do ln -sf rustup \$p; done; \
    printf 'version = \"12\"\ndefault_toolchain = \"$toolchain\"\nprofile = \"minimal\"\n' > /usr/local/rustup/settings.toml; \
    chmod -R a+w /usr/local/rustup /usr/local/cargo"
  buildah config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah run --isolation chroot "$ctr" -- cargo --version
  buildah commit -q "$ctr" localhost/rust:1-bookworm >/dev/null
  buildah rm "$ctr" >/dev/null
  echo "$(stamp) rust:1-bookworm: made ($toolchain)"
}

build_image() {
  echo "$(stamp) buildah bud $root/Dockerfile -> $image (log: $work/build.log)"
  local start=$SECONDS
  if ! buildah bud --format docker --isolation chroot --pull=never --layers \
    -f "$root/Dockerfile" -t "$image" "$root" >"$work/build.log" 2>&1; then
    tail -40 "$work/build.log" >&2
    echo "container-check: FAIL: the image did not build" >&2
    exit 1
  fi
  echo "$(stamp) built in $((SECONDS - start)) s; $(grep -E '^ *Finished' "$work/build.log" | tail -1 | sed 's/^ *//')"
  buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
  buildah inspect --type image --format '{{.Docker.Config.Healthcheck}} user={{.Docker.Config.User}} env={{.Docker.Config.Env}}' "$image"; echo
}

# `buildah run` starts no init and keeps no process after the command, so serve is started
# in the background of the same shell that asks it for its health.
check_image() {
  local ctr status=0
  ctr=$(buildah from --pull=never "$image")
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' RETURN
  echo "$(stamp) kibitz selftest (inside, as user kibitz)"
  buildah run --isolation chroot --user kibitz "$ctr" -- kibitz selftest || status=1
  echo "$(stamp) kibitz serve & kibitz healthcheck (inside)"
  buildah run --isolation chroot --user kibitz --env KIBITZ_TOKEN=container-check "$ctr" -- sh -c '
    set -u
    kibitz make-test-model /tmp/tiny >/dev/null
    MODEL_PATH=/tmp/tiny VOICE=off kibitz serve >/tmp/serve.log 2>&1 &
    serve=$!
    # Until `kibitz healthcheck` is in the build, /healthz is asked through bash (the slim
    # image has no curl) and the subcommand is reported missing.
    if kibitz help healthcheck >/dev/null 2>&1; then
      probe() { kibitz healthcheck; }
    else
      echo "healthcheck: the subcommand is not in this build; asking /healthz through bash"
      probe() { bash -c "exec 3<>/dev/tcp/127.0.0.1/8199 && printf \"GET /healthz HTTP/1.0\r\n\r\n\" >&3 && head -1 <&3" | grep -q " 200 "; }
    fi
    rc=1
    for _ in $(seq 1 60); do
      if probe; then rc=0; break; fi
      kill -0 $serve 2>/dev/null || break
      sleep 1
    done
    [ $rc -eq 0 ] && echo "healthcheck: healthy (exit 0)" || { echo "healthcheck: FAIL"; tail -20 /tmp/serve.log; }
    kill $serve 2>/dev/null; wait $serve 2>/dev/null
    exit $rc' || status=1
  return $status
}

# The runtime stage alone, around a binary built outside (see the top).
build_runtime_only() {
  local ctx="$work/runtime-only"
  rm -rf "$ctx" && mkdir -p "$ctx"
  cp "$KIBITZ_BIN" "$ctx/kibitz"
  awk 'seen { print } /^FROM / { n++ } n == 2 && !seen { seen = 1; print }' "$root/Dockerfile" \
    | sed 's|^COPY --from=build /usr/local/bin/kibitz /usr/local/bin/kibitz$|COPY kibitz /usr/local/bin/kibitz|' \
      >"$ctx/Containerfile"
  grep -q '^COPY kibitz /usr/local/bin/kibitz$' "$ctx/Containerfile" \
    || { echo "container-check: the Dockerfile's runtime stage has no COPY --from=build of the binary" >&2; exit 1; }
  image="localhost/kibitz:check-runtime"
  echo "$(stamp) buildah bud (runtime stage only, $KIBITZ_BIN) -> $image"
  local start=$SECONDS
  buildah bud --format docker --isolation chroot --pull=never --layers \
    -f "$ctx/Containerfile" -t "$image" "$ctx" >"$work/build-runtime.log" 2>&1 \
    || { tail -40 "$work/build-runtime.log" >&2; echo "container-check: FAIL: the runtime stage did not build" >&2; exit 1; }
  echo "$(stamp) built in $((SECONDS - start)) s"
  buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
  buildah inspect --type image --format '{{.Docker.Config.Healthcheck}} user={{.Docker.Config.User}} env={{.Docker.Config.Env}}' "$image"; echo
}

start=$SECONDS
make_slim
if [[ -n "${KIBITZ_BIN:-}" ]]; then
  build_runtime_only
else
  make_rust
  build_image
fi
if check_image; then
  echo "$(stamp) container-check: PASS ($((SECONDS - start)) s in all)"
else
  echo "$(stamp) container-check: FAIL" >&2
  exit 1
fi
