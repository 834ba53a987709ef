#!/usr/bin/env bash
# Soak: runs `kibitz serve` for MINUTES with 4 streams and ~200 viewers, samples the server
# every SAMPLE_EVERY seconds into a CSV, and fails if it leaks.
#
# Streams: three fixture files (they loop) and one RTSP camera (scripts/soak/rtsp-server.py,
# GStreamer's RTSP server) that is killed every DROP_EVERY seconds and comes back DROP_FOR
# seconds later, so the reconnect path runs all through. Voice on (espeak-ng). The engine is
# the real llama engine on the tiny random-weight model `kibitz make-test-model` writes: no
# download, no GPU; its words are gibberish, its work and memory are real. Cycles are kept
# cheap (1 frame, 12 tokens, MJPEG at 2 fps and 320 wide) so a 2-core machine answers every
# stream within the short run's warm-up; the soak is about what is kept, not speed.
# Viewers (scripts/soak/clients.py): SSE, WEBSOCKET and MJPEG readers (50, 50 and 100) and 4
# speech readers, spread over the streams; each reconnects after a random lifetime around
# CLIENT_LIFETIME seconds, so connections open and close all the time.
#
# Each sample: RSS, descriptors (/proc/PID/fd), threads (/proc/PID/task), the server-side
# TCP connections established on its port, the cycles done, the camera's reconnects and
# every stream's state. Descriptors are judged net of those established connections (each
# viewer holds one socket by design; a leaked one is a socket no viewer holds any more).
#
# Verdict, after a warm-up of 10 minutes (a third of runs shorter than 30 minutes) and once
# every stream has answered twice: the middle of 3 samples at the end against the middle of
# the 3 just after warm-up. FAIL if net descriptors or threads grew at all, if RSS grew
# more than 5% (runs of 10 minutes or more: shorter ones end inside the memory's warm-up,
# ~4 minutes here, and only report it), if a long run never got warm, if the server died,
# did not stop within STOP_WITHIN s of SIGTERM, or served no viewer.
#
# Env: KIBITZ_BIN (default: target/debug/kibitz, built if missing), SOAK_DIR (kept;
# default a temporary folder, removed on success), SAMPLE_EVERY (30; 10 for runs under 10
# minutes), SSE WEBSOCKET MJPEG SPEECH (client counts), CLIENT_LIFETIME, DROP_EVERY,
# DROP_FOR, STOP_WITHIN (10 s), SOAK_VOICE (espeak), SERVE_ARGS (more `serve` flags),
# MJPEG_FPS, DISPLAY_MAX_WIDTH, FRAMES_PER_INFERENCE, MAX_TOKENS, CYCLE_TIMEOUT.
#
# Usage: scripts/soak.sh MINUTES
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

minutes="${1:?usage: scripts/soak.sh MINUTES}"
total=$((minutes * 60))
((total >= 60)) || { echo "soak: at least 1 minute" >&2; exit 2; }
if ((minutes < 10)); then every="${SAMPLE_EVERY:-10}"; else every="${SAMPLE_EVERY:-30}"; fi
if ((minutes >= 30)); then warmup=600; else warmup=$((total / 3)); fi
lifetime="${CLIENT_LIFETIME:-$((total / 4 < 120 ? total / 4 : 120))}"
drop_every="${DROP_EVERY:-$((total / 3 < 180 ? total / 3 : 180))}"
drop_for="${DROP_FOR:-5}"

bin="${KIBITZ_BIN:-}"
if [[ -z "$bin" ]]; then
  bin=target/debug/kibitz
  cargo build -q -p kibitz
fi
[[ -x "$bin" ]] || { echo "soak: no kibitz binary at $bin" >&2; exit 2; }
/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null \
  || { echo "soak: GStreamer's RTSP server is missing (scripts/setup.sh installs gir1.2-gst-rtsp-server-1.0)" >&2; exit 2; }
command -v espeak-ng >/dev/null || { echo "soak: espeak-ng is missing (scripts/setup.sh)" >&2; exit 2; }

dir="${SOAK_DIR:-$(mktemp -d /tmp/kibitz-soak.XXXXXX)}"
mkdir -p "$dir"
csv="$dir/samples.csv"
server_pid="" clients_pid="" camera_pid=""
stop_all() {
  [[ -n "$clients_pid" ]] && kill "$clients_pid" 2>/dev/null || true
  [[ -n "$camera_pid" ]] && kill "$camera_pid" 2>/dev/null || true
  [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit 143' TERM INT

# The system python3 (it has GStreamer's bindings, and starts faster than a pyenv shim).
py=/usr/bin/python3
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The camera: up for DROP_EVERY seconds, down for DROP_FOR, again; its own child is killed
# with it (the trap), so nothing outlives the soak.
camera_port=$(free_port)
camera() {
  local pid=""
  trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null; exit 0' TERM
  while true; do
    "$py" scripts/soak/rtsp-server.py "$camera_port" >>"$dir/camera.log" 2>&1 &
    pid=$!
    sleep "$drop_every" & wait $!
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
    echo "$(date -u +%T) camera dropped for ${drop_for}s" >>"$dir/camera.log"
    sleep "$drop_for" & wait $!
  done
}
camera &
camera_pid=$!

"$bin" make-test-model "$dir/model" >/dev/null
: >"$dir/serve.log"
HOME="$dir/home" "$bin" serve --bind 127.0.0.1:0 --model "$dir/model" \
  --history "$dir/history.sqlite" --state-dir "$dir/state" --voice "${SOAK_VOICE:-espeak}" \
  --mjpeg-fps "${MJPEG_FPS:-2}" --display-max-width "${DISPLAY_MAX_WIDTH:-320}" \
  --frames-per-inference "${FRAMES_PER_INFERENCE:-1}" --max-tokens "${MAX_TOKENS:-12}" \
  --cycle-timeout "${CYCLE_TIMEOUT:-300}" \
  --source files=fixtures/testsrc2-360p25.mp4 --source bunny=fixtures/bigbuckbunny.mp4 \
  --source big=fixtures/testsrc2-720p25.mp4 --source cam="rtsp://127.0.0.1:$camera_port/live" \
  ${SERVE_ARGS:-} >"$dir/serve.log" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 1 120); do
  port=$(sed -n 's|^kibitz: serving http://127.0.0.1:\([0-9]*\).*|\1|p' "$dir/serve.log" | head -1 || true)
  [[ -n "$port" ]] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 1
done
[[ -n "$port" ]] || { tail -20 "$dir/serve.log" >&2; echo "soak: FAIL: serve did not start" >&2; exit 1; }
base="http://127.0.0.1:$port"
echo "soak: $minutes min on $base (pid $server_pid, $bin), samples every ${every}s, warm-up ${warmup}s, in $dir"

"$py" scripts/soak/clients.py --base "$base" --streams files,bunny,big,cam \
  --sse "${SSE:-50}" --ws "${WEBSOCKET:-50}" --mjpeg "${MJPEG:-100}" --speech "${SPEECH:-4}" \
  --lifetime "$lifetime" --seconds "$((total + 60))" --report "$every" >"$dir/clients.log" 2>&1 &
clients_pid=$!

# One sample: a CSV row from /proc and the server's own status and metrics.
sample() {
  local t=$1 rss fds threads conns metrics cycles least reconnects states viewers
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status")
  fds=$(find "/proc/$server_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  threads=$(find "/proc/$server_pid/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  conns=$(ss -Htn state established "( sport = :$port )" | wc -l)
  metrics=$(curl -s -m 10 "$base/metrics" || true)
  cycles=$(awk '/^kibitz_cycles_total/ {s += $2} END {print s + 0}' <<<"$metrics")
  least=$(awk '/^kibitz_cycles_total/ {if (n++ == 0 || $2 < m) m = $2} END {print m + 0}' <<<"$metrics")
  reconnects=$(awk '/^kibitz_source_reconnects_total\{stream="cam"\}/ {print $2 + 0}' <<<"$metrics")
  states=$(curl -s -m 10 "$base/api/streams" | "$py" -c \
    'import json,sys; print(" ".join(s["id"] + "=" + s["state"] for s in json.load(sys.stdin)["streams"]))' 2>/dev/null || echo "no-answer")
  viewers=$(grep '^{' "$dir/clients.log" 2>/dev/null | tail -1 | "$py" -c \
    'import json,sys; print(sum(json.loads(sys.stdin.read())["connected"].values()))' 2>/dev/null || echo 0)
  echo "$t,$rss,$fds,$conns,$((fds - conns)),$threads,$cycles,$least,${reconnects:-0},$viewers,$states" >>"$csv"
}

echo "t_s,rss_kib,fds,connections,fds_net,threads,cycles,least_cycles,cam_reconnects,viewers,states" >"$csv"
start=$SECONDS
next=$every
while ((next <= total)); do
  # On a schedule, not `sleep $every` after each sample: a slow sample does not stretch it.
  ((SECONDS - start < next)) && sleep $((next - (SECONDS - start)))
  next=$((next + every))
  kill -0 "$server_pid" 2>/dev/null || { tail -20 "$dir/serve.log" >&2; echo "soak: FAIL: the server died" >&2; exit 1; }
  sample $((SECONDS - start))
  tail -1 "$csv"
done

# A clean stop: SIGTERM ends it within 10 s.
kill "$clients_pid" 2>/dev/null; wait "$clients_pid" 2>/dev/null || true; clients_pid=""
stop_within="${STOP_WITHIN:-10}"
kill -TERM "$server_pid"
stop_start=$(date +%s.%N)
stopped=0
for _ in $(seq 1 $((stop_within * 10))); do kill -0 "$server_pid" 2>/dev/null || { stopped=1; break; }; sleep 0.1; done
stop_s=$("$py" -c "print(f'{$(date +%s.%N) - $stop_start:.1f}')")
if ((stopped)); then
  wait "$server_pid" 2>/dev/null || true
else
  kill -KILL "$server_pid" 2>/dev/null || true
fi
server_pid=""

verdict=$("$py" - "$csv" "$warmup" "$minutes" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
warmup = int(sys.argv[2])
# Warm: past the warm-up time, and every stream has answered twice (the engine's buffers,
# the voice, the history have all been used); memory first touched later is not a leak.
out, bad, notes = [], [], []
# Runs under 10 minutes end inside the server's warm-up of memory (buffers, the engine's,
# the allocator's: ~4 minutes here), so they judge descriptors and threads and only report
# RSS; the long run judges all three.
short = int(sys.argv[3]) < 10
after = [r for r in rows if int(r["t_s"]) >= warmup and int(r["least_cycles"]) >= 2]
if len(after) < 4:
    # Judged from the warm-up time all the same, so a starved run still says what it saw.
    never = (f"never warm: the slowest stream answered {rows[-1]['least_cycles'] if rows else 0} "
             "times (the engine had too little CPU)")
    (notes if short else bad).append(never)
    after = [r for r in rows if int(r["t_s"]) >= warmup]
if len(after) < 4:
    print(f"FAIL: {len(after)} samples after warm-up, need 4")
    sys.exit()
# The middle of 3 samples, at the start of the judged span and at its end: one sample may
# catch a viewer between connections, a camera between reconnects or a blocking-pool thread
# not yet idled out; a leak moves the middle.
mid = lambda rs, k: sorted(int(r[k]) for r in rs)[len(rs) // 2]
first, last = after[:3], after[-3:]
for key, limit in (("rss_kib", 0.05), ("fds_net", 0), ("threads", 0)):
    a, b = mid(first, key), mid(last, key)
    grew = (b - a) / a if a else 0
    judged = not (short and key == "rss_kib")
    out.append(f"{key} {a} -> {b} ({grew:+.1%}{'' if judged else ', not judged in a short run'})")
    if judged and b > a * (1 + limit):
        bad.append(key)
served = max(int(r["viewers"]) for r in rows)
if served == 0:
    bad.append("no viewers")
out.append(f"judged from t={after[0]['t_s']} s; viewers up to {served}, cycles {rows[-1]['cycles']}, "
           f"camera reconnects {rows[-1]['cam_reconnects']}")
out += notes
print(("FAIL (" + ", ".join(bad) + "): " if bad else "PASS: ") + "; ".join(out))
EOF
)
((stopped)) || verdict="FAIL (no stop within ${stop_within} s of SIGTERM): $verdict"
verdict="$verdict; stopped ${stop_s} s after SIGTERM"
echo "soak: $verdict"
echo "soak: clients: $(grep '^{' "$dir/clients.log" | tail -1)"
echo "soak: samples in $csv"
if [[ "$verdict" == PASS* ]]; then
  [[ -z "${SOAK_DIR:-}" ]] && rm -rf "$dir"
  exit 0
fi
exit 1
