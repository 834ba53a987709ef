#!/usr/bin/env bash
# Runs on the GPU machine: kibitz's batched engine and llama.cpp's own llama-server, built
# from the same llama.cpp source, on the same full-size random-weight MiniCPM-o 4.5 pair,
# with the same frames and prompt text, side by side in one run (issue 14).
#
#   scripts/gpu-bench.sh build            unpack and build llama, mtmd and llama-server (one
#                                         cmake configure, CUDA sm_90), selftest, write the
#                                         full-size model (~6 min: the first device call)
#   scripts/gpu-bench.sh bench [flags]    kibitz, then peer, then compare (the second call)
#   scripts/gpu-bench.sh kibitz [flags]   `kibitz bench --streams` for each N in KIBITZ_STREAMS
#                                         (default 1 8 16 24), one process per N, 30 tokens a
#                                         cycle, flash attention; [flags] go to every bench
#                                         (--profile-sync for the step breakdown; with
#                                         KIBITZ_TAG=name its results go to
#                                         kibitz-streams-name.jsonl)
#   scripts/gpu-bench.sh peer             llama-server -np N --cont-batching for each N in
#                                         PEER_STREAMS (default 1 8 16), driven by
#                                         scripts/peer-client.py
#   scripts/gpu-bench.sh compare          the table kibitz / llama-server per N, from the
#                                         results the phases above kept under $work
#   scripts/gpu-bench.sh all [flags]      build, then bench (needs more than one 10-minute call
#                                         on a GPU: use build + bench there)
#
# The phases share /tmp/kibitz-gpu (build, model, results), which survives between calls on
# a warm machine. A failure in one N is logged and the next N runs; every wait has a
# timeout. Each call writes under $OUT: gpu-bench-PHASE.log (or GPU_BENCH_LOG.log), and the
# results so far (kibitz-streams*.jsonl, peer-streams.jsonl, compare.md) plus
# llama-server.log: keep it to at most 8 files a call.
#
# Expects, beside the repo (carried, git-ignored; scripts/gpu-pack.sh makes them here):
#   .device/kibitz            cargo build --release -p kibitz --no-default-features
#                               --features dynamic-link, stripped
#   .device/llama.cpp.tar.xz  llama-cpp-sys-2's vendored llama.cpp plus tools/server
#   .device/frames/*.jpg      the bench's 448x252 test picture as JPEGs, for the peer client
#
# For testing without a GPU: GPU_BENCH_CPU=1 (no CUDA flags, -ngl 0), GPU_BENCH_JOBS=2,
# GPU_BENCH_TARGETS=llama-server, GPU_BENCH_MODEL=tiny, GPU_BENCH_WORK=/tmp/somewhere,
# GPU_BENCH_SECONDS / GPU_BENCH_WARMUP (default 12 / 4), GPU_BENCH_CMAKE (more cmake flags:
# "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" on a VM that announces AMX
# it does not grant). PEER_SERVER_FLAGS: more llama-server flags (e.g. --kv-unified).
set -uo pipefail
phase=${1:-all}
[ $# -gt 0 ] && shift
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# GPU_BENCH_LOG names the log (several phases of one call may share one: at most 8 files
# come back from a device call).
exec > >(tee -a "$OUT/${GPU_BENCH_LOG:-gpu-bench-$phase}.log") 2>&1
repo=$(pwd)
work=${GPU_BENCH_WORK:-/tmp/kibitz-gpu}
results="$work/results"
mkdir -p "$work" "$results"
cpu=${GPU_BENCH_CPU:-}
jobs=${GPU_BENCH_JOBS:-$(nproc)}
seconds=${GPU_BENCH_SECONDS:-12}
warmup=${GPU_BENCH_WARMUP:-4}
model_size=${GPU_BENCH_MODEL:-full}
# KIBITZ_TAG: a kibitz phase with other flags (the step profile, the levers off) writes
# kibitz-streams-TAG.jsonl, leaving the headline kibitz-streams.jsonl alone.
kibitz_results="kibitz-streams${KIBITZ_TAG:+-$KIBITZ_TAG}.jsonl"
kibitz="$repo/.device/kibitz"
server="$work/build/bin/llama-server"
[ -n "$cpu" ] && ngl=0 || ngl=99

say() { echo "== $(date -u +%T) $*"; }

# Copies what is kept so far to $OUT, so even a call cut off by its time limit returns it.
collect() {
  for f in "$results"/kibitz-streams*.jsonl "$results"/peer-streams.jsonl \
    "$results"/compare.md "$results"/llama-server.log; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  return 0
}
trap collect EXIT

libraries() {
  local libs
  libs=$(find "$work/build" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
  export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
  chmod +x "$kibitz" 2>/dev/null || true
}

# The pair make-test-model wrote: the LLM and the projector (its name says mmproj).
model_files() {
  llm=$(find "$work/model-$model_size" -name '*.gguf' ! -iname '*mmproj*' 2>/dev/null | head -1)
  mmproj=$(find "$work/model-$model_size" -name '*.gguf' -iname '*mmproj*' 2>/dev/null | head -1)
  [ -n "$llm" ] && [ -n "$mmproj" ]
}

phase_build() {
  say "on $(hostname): $(nproc) cores"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  local t0=$SECONDS
  if [ ! -x "$server" ] || [ -z "$(find "$work/build" -name 'libmtmd.so*' 2>/dev/null)" ]; then
    say "build llama, mtmd and llama-server ($([ -n "$cpu" ] && echo CPU only || echo CUDA sm_90), -j$jobs)"
    rm -rf "$work/llama.cpp"
    tar -xJf "$repo/.device/llama.cpp.tar.xz" -C "$work" || { echo "cannot unpack"; return 1; }
    local gpu_flags=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
    [ -n "$cpu" ] && gpu_flags=()
    # Tools on (the pack's tools/CMakeLists.txt adds only mtmd and server); no web UI, no
    # download, no TLS: the machine has no network.
    cmake -S "$work/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
      "${gpu_flags[@]}" -DGGML_NATIVE=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_MTMD=ON -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF ${GPU_BENCH_CMAKE:-} \
      > "$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log"; return 1; }
    # shellcheck disable=SC2086
    cmake --build "$work/build" -j "$jobs" --target ${GPU_BENCH_TARGETS:-llama mtmd llama-server} \
      > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; return 1; }
  fi
  echo "built in $((SECONDS - t0)) s"
  libraries
  ldd "$kibitz" | grep -E 'llama|mtmd|ggml|not found' || true
  "$server" --version 2>&1 | tail -2

  # GPU_BENCH_SELFTEST=0 skips it when device time is short.
  if [ "${GPU_BENCH_SELFTEST:-1}" != 0 ]; then
    say "selftest"
    timeout 120 "$kibitz" --log info,llama.cpp=info selftest 2>&1 \
      | grep -vE 'llama.cpp.*(tensor|- kv|type +f)' | tail -15 || echo "selftest failed"
  fi
  phase_model
}

phase_model() {
  libraries
  if ! model_files; then
    say "$model_size model"
    local q=()
    [ "$model_size" = full ] && q=(--quant Q4_K_M)
    timeout 540 "$kibitz" make-test-model --size "$model_size" "${q[@]}" "$work/model-$model_size" \
      || { echo "make-test-model failed"; return 1; }
  fi
  model_files || { echo "no model pair under $work/model-$model_size"; return 1; }
  ls -la "$llm" "$mmproj"
}

phase_kibitz() {
  libraries
  model_files || phase_model || return 1
  # Extra bench flags as given: --profile-sync for the step breakdown (it synchronises
  # after each decode, so its rates are a little lower), --no-share-system --eager-shifts
  # --long-question for the engine before the levers.
  local extra=("$@")
  say "kibitz bench --streams, N in ${KIBITZ_STREAMS:-1 8 16 24}, ${seconds} s after ${warmup} s, extra: ${extra[*]:-none}"
  : > "$results/$kibitz_results"
  for n in ${KIBITZ_STREAMS:-1 8 16 24}; do
    say "kibitz $n streams"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$work/mem.log" 2>/dev/null &
    local smi=$! rc
    # One process per N: a failure (or out of memory) at one N leaves the others standing.
    timeout -k 10 $((warmup + seconds + 90)) "$kibitz" --log warn bench --model "$work/model-$model_size" \
      --flash-attn on --generate 30 --warmup "$warmup" --seconds "$seconds" \
      --json --streams "$n" "${extra[@]}" > "$work/kibitz-$n.out" 2> "$work/kibitz-$n.err"
    rc=$?
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    grep -vE 'n_ctx_seq|^\s*$' "$work/kibitz-$n.err" | tail -8
    grep -E '^\|' "$work/kibitz-$n.out"
    # The bench's per-N line ("bench-streams {json}"); the engine's status rides in it.
    grep -E '^bench-streams ' "$work/kibitz-$n.out" | sed 's/^bench-streams //' \
      | python3 -c "import json,sys
mem=[int(l) for l in open('$work/mem.log') if l.strip().isdigit()]
for l in sys.stdin:
    r=json.loads(l); r['peak_gpu_mib']=max(mem) if mem else None; print(json.dumps(r))" \
      >> "$results/$kibitz_results"
    [ "$rc" = 0 ] || echo "kibitz $n streams failed (rc $rc)"
    echo "peak GPU memory: $(sort -n "$work/mem.log" 2>/dev/null | tail -1) MiB"
    collect
  done
}

# Starts llama-server for N slots and waits (at most 120 s) until it answers /health.
start_server() {
  local n=$1 port=$2
  # The synthetic model's template is plain ChatML; this one adds the empty think block
  # when thinking is off, as Qwen3's does and as kibitz's own prompt ends.
  cat > "$work/chatml-think.jinja" <<'EOF'
{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}
EOF
  # kibitz sizes 2048 positions a stream; so do the slots here.
  # shellcheck disable=SC2086
  "$server" -m "$llm" --mmproj "$mmproj" -ngl "$ngl" -fa on -np "$n" --cont-batching \
    -c $((2048 * n)) --host 127.0.0.1 --port "$port" --no-webui --jinja \
    --chat-template-file "$work/chatml-think.jinja" ${PEER_SERVER_FLAGS:-} \
    > "$work/server-$n.log" 2>&1 &
  server_pid=$!
  local waited=0
  until curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1 \
    || python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then echo "llama-server for $n slots exited"; return 1; fi
    if [ "$waited" -ge 120 ]; then echo "llama-server for $n slots not ready in 120 s"; return 1; fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "llama-server ready in ${waited} s"
}

stop_server() {
  [ -n "${server_pid:-}" ] || return 0
  kill "$server_pid" 2>/dev/null
  for _ in $(seq 20); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$server_pid" 2>/dev/null
  wait "$server_pid" 2>/dev/null
  server_pid=
}

phase_peer() {
  libraries
  model_files || phase_model || return 1
  [ -x "$server" ] || { echo "no llama-server at $server: run the build phase"; return 1; }
  say "llama-server -np N --cont-batching, N in ${PEER_STREAMS:-1 8 16}, ${seconds} s after ${warmup} s"
  : > "$results/peer-streams.jsonl"
  : > "$results/llama-server.log"
  # kibitz's own words for the peer (the short cue unless PEER_PROMPT_FLAGS says otherwise).
  "$kibitz" bench --print-prompt ${PEER_PROMPT_FLAGS:-} > "$work/prompt.json" \
    || { echo "kibitz bench --print-prompt failed"; return 1; }
  local port=8090
  for n in ${PEER_STREAMS:-1 8 16}; do
    say "llama-server $n slots"
    if start_server "$n" "$port"; then
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$work/mem.log" 2>/dev/null &
      local smi=$!
      timeout -k 10 $((warmup + seconds + 75)) python3 "$repo/scripts/peer-client.py" \
        --url "http://127.0.0.1:$port/v1" --streams "$n" --seconds "$seconds" --warmup "$warmup" \
        --timeout 30 --json-out "$work/peer-$n.json" --prompt "$work/prompt.json" \
        "$repo"/.device/frames/*.jpg \
        || echo "peer client at $n streams failed"
      kill "$smi" 2>/dev/null
      wait "$smi" 2>/dev/null
      [ -f "$work/peer-$n.json" ] && python3 -c "import json,sys
mem=[int(l) for l in open('$work/mem.log') if l.strip().isdigit()]
for r in json.load(open('$work/peer-$n.json')):
    r['peak_gpu_mib']=max(mem) if mem else None; print(json.dumps(r))" >> "$results/peer-streams.jsonl"
      echo "peak GPU memory: $(sort -n "$work/mem.log" 2>/dev/null | tail -1) MiB"
    fi
    stop_server
    {
      echo "==== llama-server -np $n"
      grep -vE 'tensor|- kv |llama_model_loader: - type|print_info|load_tensors: +layer' "$work/server-$n.log" \
        | grep -vE 'srv +log_server_r|slot +(update_slots|print_timing|launch_slot_|release)' | head -150
      echo "...(last lines)"
      tail -40 "$work/server-$n.log"
    } >> "$results/llama-server.log"
    rm -f "$work/peer-$n.json"
    port=$((port + 1))
    collect
  done
}

phase_compare() {
  say "kibitz / llama-server"
  python3 - "$results/kibitz-streams.jsonl" "$results/peer-streams.jsonl" > "$results/compare.md" <<'EOF'
import json, sys

def load(path):
    rows = {}
    try:
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                rows[r["streams"]] = r
    except OSError:
        pass
    return rows

def p(r, key, q):
    v = (r or {}).get(key) or {}
    return v.get(q)

def cell(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)

def ratio(a, b, invert=False):
    if a is None or b is None or a == 0 or b == 0:
        return "-"
    return "{:.2f}x".format(b / a if invert else a / b)

k, s = load(sys.argv[1]), load(sys.argv[2])
print("| streams | kibitz cycles/s each | llama-server cycles/s each | ratio | "
      "kibitz newest frame -> first token p50 / p95 ms | llama-server, same measure | "
      "ratio p50 (server/kibitz) | kibitz cycle p50 / p95 ms | llama-server cycle p50 / p95 ms | "
      "llama-server request -> first token p50 / p95 ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n in sorted(set(k) | set(s)):
    a, b = k.get(n), s.get(n)
    ka = (a or {}).get("cycles_per_s_mean")
    sb = (b or {}).get("cycles_per_s_mean")
    print("| {} | {} | {} | {} | {} / {} | {} / {} | {} | {} / {} | {} / {} | {} / {} |".format(
        n, cell(ka, "{:.2f}"), cell(sb, "{:.2f}"), ratio(ka, sb),
        cell(p(a, "first_token_ms", "p50")), cell(p(a, "first_token_ms", "p95")),
        cell(p(b, "first_token_ms", "p50")), cell(p(b, "first_token_ms", "p95")),
        ratio(p(a, "first_token_ms", "p50"), p(b, "first_token_ms", "p50"), invert=True),
        cell(p(a, "cycle_ms", "p50")), cell(p(a, "cycle_ms", "p95")),
        cell(p(b, "cycle_ms", "p50")), cell(p(b, "cycle_ms", "p95")),
        cell(p(b, "request_first_token_ms", "p50")), cell(p(b, "request_first_token_ms", "p95"))))
EOF
  cat "$results/compare.md"
  collect
}

rc=0
case "$phase" in
  build) phase_build || rc=1 ;;
  model) phase_model || rc=1 ;;
  kibitz) phase_kibitz "$@" || rc=1 ;;
  peer) phase_peer || rc=1 ;;
  compare) phase_compare || rc=1 ;;
  bench)
    phase_kibitz "$@" || rc=1
    phase_peer || rc=1
    phase_compare || rc=1
    ;;
  all)
    phase_build || exit 1
    phase_kibitz "$@" || rc=1
    phase_peer || rc=1
    phase_compare || rc=1
    ;;
  *) echo "usage: $0 build|model|kibitz [bench flags]|peer|compare|bench [bench flags]|all [bench flags]"; exit 2 ;;
esac
say "done $phase (rc $rc)"
exit $rc
