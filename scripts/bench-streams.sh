#!/usr/bin/env bash
# Several 720p25 streams in one `kibitz serve`: CPU and memory per added stream, how many
# the machine decodes at full rate, and the memory DELETE gives back.
# Results and method: docs/benchmarks.md, "Several streams (CPU, memory, DELETE)".
#
#   cargo build --release -p kibitz --no-default-features --features media
#   scripts/fixtures.sh
#   scripts/bench-streams.sh                        # glibc malloc defaults
#   MALLOC_ARENA_MAX=2 scripts/bench-streams.sh     # the environment reaches the server
#
# The server gets a dead OpenAI upstream (127.0.0.1:9), so no model is needed: each
# stream's commentary loop fails a cycle a second and waits, the rest of the pipeline
# (decode, display JPEG, 2 fps capture, playout) runs as in production. Streams s2, s3, …
# are added through `POST /api/streams`, alternating bigbuckbunny.mp4 and testsrc2-720p25.mp4
# (s1, from --source, is testsrc2). After each: BENCH_SETTLE s to settle, then a
# BENCH_WINDOW s window: the process's CPU (utime + stime of /proc/PID/stat; the
# `kibitz-decode` threads apart), VmRSS at the window's end, every stream's frames over the
# window and its `source.fps` (the server's own 2 s measure). A step is behind when a
# stream falls below BENCH_MIN_FPS or the process reaches BENCH_MAX_CORES; it stops after
# BENCH_BEHIND behind steps in a row (a single one between full-rate steps is other load
# on the box, and is logged as such), or at BENCH_MAX streams. Then it deletes all streams but s1 and samples
# memory BENCH_AFTER seconds later; with BENCH_TRIM=1 and gdb present it reads malloc's
# own count of live allocations (malloc_stats) before the DELETEs, then calls malloc_trim(0)
# and reads it again, to tell memory malloc keeps from memory still in use. With
# BENCH_ROUNDS > 1 it adds the same streams again and deletes them again, once a round:
# live memory that returns to the first round's level was reused, not leaked. Run rounds
# below the full-rate count (past it memory grows fast, see the docs):
#   BENCH_FROM=8 BENCH_MAX=8 BENCH_ROUNDS=4 BENCH_AFTER="5 15" scripts/bench-streams.sh
# It also stops adding when RSS passes BENCH_MAX_RSS_MIB (default: half of MemAvailable).
#
# Loopback only. Every wait is bounded; the server is stopped on exit. Needs curl, python3.
# Logs, per-step TSV and the server's stderr go to BENCH_OUT (default: a new temp folder).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${KIBITZ_BIN:-$root/target/release/kibitz}"
max="${BENCH_MAX:-20}"             # most streams, s1 included
settle="${BENCH_SETTLE:-10}"
window="${BENCH_WINDOW:-10}"
min_fps="${BENCH_MIN_FPS:-24}"
max_cores="${BENCH_MAX_CORES:-1.9}"
behind_needed="${BENCH_BEHIND:-2}" # stop after this many steps in a row fall behind
from="${BENCH_FROM:-1}"            # add s2..sFROM at once (1 s apart), measure from there
after="${BENCH_AFTER:-5 15 30}"    # seconds after the DELETEs to sample memory
quiet_load="${BENCH_QUIET_LOAD:-0.7}"
quiet_wait="${BENCH_QUIET_WAIT:-300}"
trim="${BENCH_TRIM:-1}"            # malloc_trim(0) through gdb after the DELETEs
nice="${BENCH_NICE:-}"              # e.g. -10: see where the server starts
rounds="${BENCH_ROUNDS:-1}"        # add-all/delete-all rounds (the first is the measured one)
max_rss_mib="${BENCH_MAX_RSS_MIB:-$(awk '/^MemAvailable:/ {print int($2 / 2048)}' /proc/meminfo)}"
out="${BENCH_OUT:-$(mktemp -d /tmp/bench-streams.XXXXXX)}"
files=("$root/fixtures/bigbuckbunny.mp4" "$root/fixtures/testsrc2-720p25.mp4")
first="$root/fixtures/testsrc2-720p25.mp4"

for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "bench-streams: needs $tool" >&2; exit 1; }
done
[[ -x "$bin" ]] || { echo "bench-streams: no $bin; build it first (see the top of this script)" >&2; exit 1; }
for f in "${files[@]}"; do
    [[ -s "$f" ]] || { echo "bench-streams: no $f; run scripts/fixtures.sh" >&2; exit 1; }
done
mkdir -p "$out/state"
hz="$(getconf CLK_TCK)"
log() { echo "$*" | tee -a "$out/bench.log"; }
load1() { cut -d' ' -f1 /proc/loadavg; }
gt() { python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$1" "$2"; }

# --- a quiet machine first (bounded) -------------------------------------------------
waited=0
while gt "$(load1)" "$quiet_load" && ((waited < quiet_wait)); do
    ((waited == 0)) && log "bench-streams: load $(load1) > $quiet_load, waiting up to ${quiet_wait}s"
    sleep 10; waited=$((waited + 10))
done
gt "$(load1)" "$quiet_load" && log "bench-streams: WARNING: starting at load $(load1) anyway"

log "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(free -m | awk '/^Mem:/ {print $2 " MiB"}'), $(uname -r), $(ldd --version | head -1)"
log "ffmpeg: $(ffmpeg -version 2>/dev/null | head -1 || echo '?')"
log "binary: $bin ($(stat -c %y "$bin" | cut -d. -f1))"
log "server niceness: ${nice:-0 (unchanged)}"
log "malloc env: $(env | grep -E '^(MALLOC_|GLIBC_TUNABLES)' | tr '\n' ' ' || true)"
log "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
log "out: $out"
# The upstream must be dead: nothing may answer on 127.0.0.1:9.
if curl -s -o /dev/null -m 2 http://127.0.0.1:9/ ; then
    log "bench-streams: WARNING: something answers on 127.0.0.1:9; commentary cycles will reach it"
fi

# --- the server ------------------------------------------------------------------------
pid=""
stop() {
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=""
}
trap stop EXIT
trap 'exit 130' INT TERM

# BENCH_NICE (e.g. -10, needs root) runs the server in its own session at that niceness and
# gives its autogroup the same, so builds beside it get what it leaves: on a shared box this
# stands in for a quiet one. Other processes' CPU is still logged for every window.
launch=()
: >"$out/server.out"
if [[ -n "$nice" ]]; then launch=(setsid nice -n "$nice"); fi
"${launch[@]}" "$bin" serve --bind 127.0.0.1:0 --engine openai --engine-url http://127.0.0.1:9 \
    --media-dir "$root/fixtures" --state-dir "$out/state" --max-streams "$max" \
    --source "$first" >"$out/server.out" 2>"$out/server.log" &
pid=$!
addr=""
for _ in $(seq 300); do
    addr="$(sed -n '1s|^kibitz: serving http://\([^ ]*\).*|\1|p' "$out/server.out")"
    [[ -n "$addr" ]] && break
    kill -0 "$pid" 2>/dev/null || { cat "$out/server.log" >&2; echo "bench-streams: server exited" >&2; exit 1; }
    sleep 0.1
done
[[ -n "$addr" ]] || { echo "bench-streams: no address after 30 s" >&2; exit 1; }
case "$addr" in 127.0.0.1:*) ;; *) echo "bench-streams: not loopback: $addr" >&2; exit 1 ;; esac
api="http://$addr/api"
log "server: pid $pid at $addr"
if [[ -n "$nice" ]]; then
    echo "$nice" >"/proc/$pid/autogroup" || log "bench-streams: cannot set the autogroup's nice"
    log "server: nice $(ps -o ni= -p "$pid" | xargs), $(cat "/proc/$pid/autogroup")"
fi

# --- measuring -------------------------------------------------------------------------
# One reading, taken by one `cat` so that its clock and counters agree even when this
# script waits for a core: uptime (s), the machine's busy ticks (all processes, steal
# included, /proc/stat), the process's ticks (utime + stime of /proc/PID/stat, ended threads
# included), then the live threads' ticks by group: kibitz-decode (the Rust loop: pacing,
# range stretch, display JPEG, capture), FFmpeg (every `tokio-rt-worker` past the runtime's
# first `nproc`: FFmpeg's frame threads take the name of the thread that opened the file,
# one of tokio's blocking pool), runtime (main + tokio's `nproc` workers: HTTP, commentary
# loops, playout); then the count of kibitz-decode threads and of all threads.
workers="$(nproc)"
ticks() {
    { cat /proc/uptime /proc/stat "/proc/$pid/stat"; echo "--"
      cat /proc/"$pid"/task/*/stat 2>/dev/null | sort -n; } | awk -v workers="$workers" '
        function t(line,   c, a) { c = index(line, ") "); split(substr(line, c + 2), a, " "); return a[12] + a[13] }
        function comm(line) { return substr(line, index(line, "(") + 1, index(line, ") ") - index(line, "(") - 1) }
        NR == 1 { up = $1; next }
        /^--$/ { tasks = 1; next }
        !tasks && /^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; next }
        !tasks && /\(/ { total = t($0); next }
        tasks { n++; k = t($0); c = comm($0)
                if (c ~ /^kibitz-decode/) { d += k; nd++ }
                else if (c ~ /^tokio/ && ++nw > workers) f += k
                else r += k }
        END { print up, busy, total, d + 0, f + 0, r + 0, nd + 0, n + 0 }'
}
# resident kiB by kind of mapping: [heap] (main malloc arena), other anonymous (thread
# arenas, large malloc blocks, stacks), file-backed; then the anonymous mappings holding any.
# A mapping that changes while smaps is read (brk) can be listed twice: each start address
# counts once, with its last value.
smaps() {
    awk '/^[0-9a-f]+-[0-9a-f]+ / { split($1, r, "-"); start = r[1]
                                   kind[start] = $6 == "[heap]" ? "h" : $6 ~ /^\// ? "f" : "a"; next }
         /^Rss:/ { rss[start] = $2 }
         END { for (k in rss) { t[kind[k]] += rss[k]; if (kind[k] == "a" && rss[k] > 0) na++ }
               print t["h"] + 0, t["a"] + 0, t["f"] + 0, na + 0 }' "/proc/$pid/smaps" 2>/dev/null || echo "0 0 0 0"
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }
# Every stream's status into DIR/ID.json, with the time it was taken (the middle of the
# request) in DIR/ID.t.
statuses() {
    local dir="$1" id t; mkdir -p "$dir"
    for id in "${ids[@]}"; do
        t="$EPOCHREALTIME"
        curl -s -m 5 -o "$dir/$id.json" "$api/streams/$id/status" || echo '{}' >"$dir/$id.json"
        echo "$t $EPOCHREALTIME" >"$dir/$id.t"
    done
}

cat >"$out/step.py" <<'PY'
import json, sys
# argv: t0dir t1dir hz "ticks at t0" "ticks at t1" ids...  (ticks: see ticks() in the script)
t0, t1, hz = sys.argv[1], sys.argv[2], float(sys.argv[3])
k0, k1 = [list(map(float, a.split())) for a in sys.argv[4:6]]
ids = sys.argv[6:]
wall = k1[0] - k0[0]
def load(d, i):
    try:
        return json.load(open(f"{d}/{i}.json")), sum(map(float, open(f"{d}/{i}.t").read().split())) / 2
    except Exception:
        return {}, 0.0
rates, fps, dropped, disp, states, per = [], [], 0, 0, set(), []
for i in ids:
    (a, ta), (b, tb) = load(t0, i), load(t1, i)
    sa, sb = a.get("source", {}), b.get("source", {})
    r = (sb.get("frames", 0) - sa.get("frames", 0)) / max(tb - ta, 1e-9)
    rates.append(r); fps.append(sb.get("fps") or 0.0)
    dropped += sb.get("frames_dropped", 0)
    db = b.get("buffers", {}).get("display_bytes", 0); disp += db
    states.add(sb.get("state", "?"))
    per.append(f"{i}:{r:.2f}/{(sb.get('fps') or 0):.2f}/{db/1e6:.1f}MB/{sb.get('frames_dropped', 0)}")
box, cores, dec, ff, rt = [(b - a) / hz / wall for a, b in zip(k0[1:6], k1[1:6])]
print(f"{cores:.3f}\t{dec:.3f}\t{ff:.3f}\t{rt:.3f}\t{box - cores:.3f}\t{min(rates):.2f}\t{min(fps):.2f}"
      f"\t{dropped}\t{disp}\t{','.join(sorted(states))}\t{' '.join(per)}")
PY

# add ID: POST /api/streams for sN, bigbuckbunny for even N, testsrc2 for odd.
add() {
    local id="$1" file="${files[$((${1#s} % 2))]}" code
    code="$(curl -s -m 10 -o "$out/add.$id.json" -w '%{http_code}' -X POST -H 'content-type: application/json' \
        -d "{\"id\": \"$id\", \"source\": \"$file\"}" "$api/streams" || true)"
    [[ "$code" == 201 ]] || { log "POST $id: HTTP $code $(cat "$out/add.$id.json" 2>/dev/null)"; return 1; }
    ids+=("$id")
}
ids=(s1)
printf 'streams\tcores\tdecode_thread_cores\tffmpeg_thread_cores\truntime_cores\trest_of_box_cores\tmin_rate\tmin_source_fps\tdropped\tdisplay_bytes\tstates\trss_kib\tdecode_threads\tthreads\tload1\theap_kib\tother_anon_kib\tper_stream(id:rate/fps/display/dropped)\n' >"$out/steps.tsv"
streak=0; last_ok=0; transient=""
n=1
while ((n < from)); do
    n=$((n + 1)); add "s$n" || { n=$((n - 1)); break; }; sleep 1
done
while :; do
    sleep "$settle"
    statuses "$out/t0.$n"
    k0="$(ticks)"
    sleep "$window"
    k1="$(ticks)"
    read -r _ _ _ _ _ _ nd nt <<<"$k1"
    rss="$(rss_kib)"; read -r heap anon _ _ <<<"$(smaps)"
    statuses "$out/t1.$n"
    IFS=$'\t' read -r cores dec ff rt others rate fps dropped disp states per <<<"$(
        python3 "$out/step.py" "$out/t0.$n" "$out/t1.$n" "$hz" "$k0" "$k1" "${ids[@]}")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$cores" "$dec" "$ff" "$rt" "$others" \
        "$rate" "$fps" "$dropped" "$disp" "$states" "$rss" "$nd" "$nt" "$(load1)" "$heap" "$anon" "$per" >>"$out/steps.tsv"
    log "$(printf '%2d streams: %s cores (kibitz-decode %s, FFmpeg %s, runtime %s; rest of the box %s) RSS %s MiB, display %s MB, slowest %s fps (source.fps %s), dropped %s, %s, load %s' \
        "$n" "$cores" "$dec" "$ff" "$rt" "$others" "$((rss / 1024))" "$((disp / 1000000))" "$rate" "$fps" "$dropped" "$states" "$(load1)")"
    if gt "$min_fps" "$rate" || gt "$min_fps" "$fps" || ! gt "$max_cores" "$cores"; then
        streak=$((streak + 1))
        log "   -> behind at $n streams"
    else
        ((streak > 0)) && transient+="$((n - streak))..$((n - 1)) "
        streak=0; last_ok=$n
    fi
    if ((streak >= behind_needed)) || ((n >= max)); then break; fi
    if ((rss / 1024 > max_rss_mib)); then log "RSS past BENCH_MAX_RSS_MIB ($max_rss_mib): no more streams"; break; fi
    n=$((n + 1))
    add "s$n" || { n=$((n - 1)); break; }
done
if ((streak >= behind_needed)); then
    log "full rate: $last_ok streams (behind from $((n - streak + 1)) on)"
else
    log "full rate: $last_ok streams; BENCH_MAX ($max) reached$( ((streak == 0)) || echo ", the last step behind")"
fi
[[ -z "$transient" ]] || log "behind for one step only, between full-rate steps (other load): ${transient}"

# --- DELETE all but s1 -------------------------------------------------------------------
snapshot() { # label
    local dir="$out/mem.${1// /_}" disp rss nd nt
    statuses "$dir"
    disp="$(python3 -c '
import json, sys
print(sum(json.load(open(f"{sys.argv[1]}/{i}.json")).get("buffers", {}).get("display_bytes", 0) for i in sys.argv[2:]))
' "$dir" "${ids[@]}")"
    read -r _ _ _ _ _ _ nd nt <<<"$(ticks)"
    rss="$(rss_kib)"
    read -r heap anon file nanon <<<"$(smaps)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "${#ids[@]}" "$rss" "$disp" "$nd" "$nt" \
        "$heap" "$anon" "$file" "$nanon" >>"$out/delete.tsv"
    log "$(printf '%-18s %2d streams: RSS %4d MiB (heap %d, other anon %d in %d maps, files %d MiB), display buffers %9d bytes, decode threads %2d, threads %2d' \
        "$1" "${#ids[@]}" "$((rss / 1024))" "$((heap / 1024))" "$((anon / 1024))" "$nanon" "$((file / 1024))" "$disp" "$nd" "$nt")"
}
# Deletes every stream but s1; logs the answers and the slowest.
delete_all() {
    local id t code ms codes="" slowest=0
    for id in "${ids[@]:1}"; do
        t="$EPOCHREALTIME"
        code="$(curl -s -m 10 -o "$out/del.$id.out" -w '%{http_code}' -X DELETE "$api/streams/$id" || true)"
        ms="$(python3 -c "print(round(($EPOCHREALTIME - $t) * 1000))")"
        [[ "$code" == 204 ]] || log "DELETE $id: HTTP $code $(cat "$out/del.$id.out")"
        codes+="$code "; ((ms > slowest)) && slowest=$ms
    done
    log "DELETE of $((${#ids[@]} - 1)) streams: $(tr ' ' '\n' <<<"$codes" | sed '/^$/d' | sort | uniq -c | xargs) (HTTP), slowest ${slowest} ms"
    ids=(s1)
}
# malloc_stats() (glibc) prints to the server's stderr, per arena and in total, as 32-bit
# numbers; the total is taken as the arenas' sum plus the mmapped rest modulo 4 GiB, which
# is right while no arena and the mmapped part reach 4 GiB. "In use" is every live malloc
# allocation (Rust, FFmpeg and libjpeg-turbo all allocate with malloc); what RSS has beyond
# it is freed memory malloc keeps. With TRIM=1, malloc_trim(0) runs first (and a snapshot).
malloc_report() { # label trim(0|1)
    [[ "$trim" == 1 ]] && command -v gdb >/dev/null || return 0
    local mark cmds=(-ex 'call (void) malloc_stats()')
    [[ "$2" == 1 ]] && cmds=(-ex 'call (int) malloc_trim(0)' "${cmds[@]}")
    mark="$(wc -l <"$out/server.log")"
    timeout 60 gdb -p "$pid" -batch "${cmds[@]}" >>"$out/gdb.log" 2>&1 ||
        { log "gdb failed (see $out/gdb.log)"; return 0; }
    sleep 1
    [[ "$2" == 1 ]] && snapshot "$1"
    log "$(printf '%-18s ' "$1")$(tail -n +"$((mark + 1))" "$out/server.log" | python3 -c '
import re, sys
arena_sys = arena_use = total_sys = total_use = 0
in_total = False
for line in sys.stdin:
    if line.startswith("Total"):
        in_total = True
    m = re.match(r"(system|in use) bytes\s*=\s*(\d+)", line)
    if not m:
        continue
    v = int(m.group(2))
    if in_total:
        if m.group(1) == "system": total_sys = v
        else: total_use = v
    elif m.group(1) == "system": arena_sys += v
    else: arena_use += v
mmapped = (total_use - arena_use) % 2**32
use, held = arena_use + mmapped, arena_sys + mmapped
print(f"malloc: in use {use / 2**20:.0f} MiB (mmapped {mmapped / 2**20:.0f}), held {held / 2**20:.0f} MiB")
')"
}
printf 'when\tstreams\trss_kib\tdisplay_bytes\tdecode_threads\tthreads\theap_kib\tother_anon_kib\tfile_kib\tanon_maps\n' >"$out/delete.tsv"
snapshot before
malloc_report before 0
log "commentary (dead upstream): $(python3 -c '
import json, sys
c = [json.load(open(f"{sys.argv[1]}/{i}.json")).get("commentary", {}) for i in sys.argv[2:]]
done, failed = (sum(x.get(k, 0) for x in c) for k in ("cycles_done", "cycles_failed"))
print(f"cycles done {done}, failed {failed} over {len(c)} streams")
' "$out/mem.before" "${ids[@]}")"
added=$n
t_del="$EPOCHREALTIME"
delete_all
left="$(curl -s -m 5 "$api/streams" | python3 -c 'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin)["streams"]))' || echo '?')"
log "GET /api/streams after: $left; GET /api/streams/s2/status: HTTP $(curl -s -m 5 -o /dev/null -w '%{http_code}' "$api/streams/s2/status" || true)"
for s in $after; do
    sleep "$(python3 -c "print(max(0.0, $t_del + $s - $EPOCHREALTIME))")"
    snapshot "after ${s}s"
done
malloc_report "malloc_trim" 1
last="${after##* }"
# Later rounds: add the same streams again, let their buffers fill, delete them again. RSS
# that comes back to the first round's level means the memory was reused, not leaked.
for round in $(seq 2 "$rounds"); do
    if (($(rss_kib) / 1024 > max_rss_mib / 2)); then log "RSS past half of BENCH_MAX_RSS_MIB: no more rounds"; break; fi
    for k in $(seq 2 "$added"); do
        add "s$k" || break
    done
    sleep $((settle + window))
    snapshot "round $round added"
    malloc_report "round $round added" 0
    delete_all
    sleep "$last"
    snapshot "round $round after ${last}s"
    malloc_report "round $round trim" 1
done
log "server stderr: $(wc -l <"$out/server.log") lines, $(grep -c ERROR "$out/server.log" || true) ERROR, $(grep -c WARN "$out/server.log" || true) WARN"
log "steps: $out/steps.tsv; delete: $out/delete.tsv"
