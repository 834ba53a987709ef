#!/usr/bin/env python3
"""N live commentary streams against any OpenAI-compatible server, the way kibitz's own
`kibitz bench --streams` drives its engine, so the two can be compared side by side
(issue 14: llama.cpp's llama-server beside kibitz, same model, frames and prompt text).

Python 3 standard library only: the GPU machine has python3 but no network and no pip.

What a stream sends, each cycle, as `POST {url}/chat/completions`:
  - the system message kibitz's bench sends (profile "default", English, not spoken),
    read from --prompt, the JSON `kibitz bench --print-prompt` prints, so the words are
    kibitz's own and cannot drift;
  - one user message: for each of the 4 newest frames "Frame at {pts:.1f}s: " then the
    frame (a base64 JPEG data URL), each frame on its own line, then the cycle's question
    from the same JSON (the short cue by default, with the previous answer once there is
    one). llama-server joins these parts into exactly the text kibitz's llama engine
    evaluates (llama.rs: frame_piece, question_piece); the server's chat template must end
    the prompt with the empty think block, as gpu-bench.sh's template does;
  - `max_tokens` 30, `stream: true`, `ignore_eos: true` (llama-server, vLLM and SGLang take
    it; --no-ignore-eos leaves it out), `chat_template_kwargs: {enable_thinking: false}`,
    and kibitz's default sampling (temperature 0.7, top_p 0.8, top_k 100, seed 42).

Pacing, as kibitz's bench paces its live loops (interval 0, frame stride 1): each stream
has a source that captures one sampled frame a second (frame j at start + offset + j s,
the offset 37*i % 500 ms for stream i, as the bench staggers its sources; the frame's
time label is j s). A cycle starts when a frame is captured after the previous cycle
ended (the commentator's freshness rule: newest frame captured at or after the end of
the previous cycle plus the interval, here 0), and sends the 4 newest frames (the first
cycle waits for 4). So cycles start at most once a second, each on a frame's arrival,
and a stream whose cycle takes longer than a second runs at 1/2, 1/3, ... of the frame
rate, as kibitz's do. kibitz's loop notices the new frame on its 100 ms poll (~50 ms
later on average); this client at once.

Measured per cycle (only cycles that end inside the measured window, after --warmup):
  first_token_ms          newest frame captured -> first answer token (kibitz's
                          "newest frame -> first token": CycleEnd.first_token_latency)
  request_first_token_ms  request sent -> first answer token (plain TTFT)
  cycle_ms                request sent -> answer complete (kibitz's inference_ms)
Per N: cycles/s per stream (mean, min), p50/p95 (nearest rank, as kibitz's bench), tokens/s
of all streams, errors; one table row and one JSON object per N, the same keys as the
JSON line `kibitz bench --streams --json` prints.

Usage:
  peer-client.py --url http://127.0.0.1:8080/v1 --streams 1,8,16 --seconds 12 --warmup 4 \\
      .device/frames/*.jpg
"""

import argparse
import base64
import http.client
import json
import math
import sys
import threading
import time
import urllib.parse

# CommentatorConfig::default().sampling
SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 100, "seed": 42}


def load_prompt(path):
    """The words kibitz's bench sends, from `kibitz bench --print-prompt [--long-question]`:
    {"system": ..., "first": the first cycle's question, "next": later ones', with "{last}"
    where the previous answer goes}. Taken from kibitz itself so the texts cannot drift."""
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)
    for key in ("system", "first", "next"):
        if not isinstance(prompt.get(key), str):
            raise SystemExit(f"{path}: no '{key}' text (make it with kibitz bench --print-prompt)")
    return prompt


def question(prompt, last_comment):
    if last_comment is None:
        return prompt["first"]
    return prompt["next"].replace("{last}", last_comment)


def is_skip(answer):
    """commentator::is_skip: empty or only dots and quotes."""
    return all(c.isspace() or c in ".…\"'`" for c in answer)


def content_parts(labels_and_urls, question):
    """The user content: 'Frame at Xs: ' <image> per frame, each on its own line, then the
    question. llama-server joins text after an image without a newline and two texts with
    one, so this reads 'Frame at 0.0s: <image>\\nFrame at 1.0s: <image>\\n...\\nquestion'."""
    parts = []
    for k, (label, url) in enumerate(labels_and_urls):
        parts.append({"type": "text", "text": ("\n" if k else "") + label})
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": "\n" + question})
    return parts


def percentiles(values):
    """Nearest rank at round((n-1)q), as kibitz's bench."""
    if not values:
        return None
    v = sorted(values)

    def at(q):
        return v[int(round((len(v) - 1) * q))]

    return {"p50": at(0.5), "p95": at(0.95), "mean": sum(v) / len(v)}


class Tally:
    def __init__(self):
        self.cycles = 0
        self.first_token_ms = []
        self.request_first_token_ms = []
        self.cycle_ms = []
        self.pieces = 0
        self.errors = 0
        self.prompt_tokens = []
        self.prompt_evaluated = []
        self.last_error = None


class Stream(threading.Thread):
    def __init__(self, i, args, urls, start, measure_from, measure_to, print_request):
        super().__init__(daemon=True)
        self.i = i
        self.args = args
        self.urls = urls
        self.offset = (37 * i % 500) / 1000.0
        self.start_at = start
        self.measure_from = measure_from
        self.measure_to = measure_to
        self.print_request = print_request
        self.tally = Tally()
        self.last_comment = None
        self.conn = None
        u = urllib.parse.urlsplit(args.url.rstrip("/") + "/chat/completions")
        self.host, self.port, self.path = u.hostname, u.port or 80, u.path
        if u.scheme != "http":
            raise SystemExit("only http:// URLs (a local server)")

    def captured(self, j):
        return self.start_at + self.offset + j * self.args.frame_period

    def body(self, newest):
        n = self.args.frames
        frames = range(newest - n + 1, newest + 1)
        labels = [
            (f"Frame at {j * self.args.frame_period:.1f}s: ", self.urls[(j + 7 * self.i) % len(self.urls)])
            for j in frames
        ]
        prompt = self.args.prompt_text
        body = {
            "model": self.args.model,
            "messages": [
                {"role": "system", "content": prompt["system"]},
                {"role": "user", "content": content_parts(labels, question(prompt, self.last_comment))},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": self.args.max_tokens,
            "chat_template_kwargs": {"enable_thinking": False},
            **SAMPLING,
        }
        if self.args.ignore_eos:
            body["ignore_eos"] = True
        return body

    def run(self):
        n = self.args.frames
        period = self.args.frame_period
        last_newest = -1
        ended = None
        while True:
            now = time.monotonic()
            if now >= self.measure_to:
                break
            newest = int((now - self.start_at - self.offset) // period)
            # The first frame captured at or after the previous cycle's end.
            need = max(last_newest + 1, n - 1)
            if ended is not None:
                need = max(need, math.ceil((ended - self.start_at - self.offset) / period - 1e-9))
            if newest < need:
                time.sleep(max(0.0, min(self.captured(need), self.measure_to) - now))
                continue
            self.cycle(newest)
            last_newest = newest
            ended = time.monotonic()
        if self.conn:
            self.conn.close()

    def send(self, data):
        """POSTs on the stream's kept-alive connection; a connection the server closed while
        idle (cpp-httplib ends one after a few requests) is opened again once, before any
        answer came, so it is no error."""
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            **({"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}),
        }
        for attempt in (0, 1):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.args.timeout)
            try:
                self.conn.request("POST", self.path, body=data, headers=headers)
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if not reused or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def cycle(self, newest):
        body = self.body(newest)
        if self.print_request:
            self.print_request = False
            shown = json.loads(json.dumps(body))
            for part in shown["messages"][1]["content"]:
                if part["type"] == "image_url":
                    part["image_url"]["url"] = part["image_url"]["url"][:40] + "..."
            print(json.dumps(shown, indent=1), file=sys.stderr)
        data = json.dumps(body).encode()
        sent = time.monotonic()
        first = None
        text = []
        pieces = 0
        usage = {}
        timings = {}
        error = None
        try:
            resp = self.send(data)
            if resp.status != 200:
                error = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
            else:
                while True:
                    line = resp.readline()
                    if not line:
                        break
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        error = str(chunk["error"])[:300]
                        break
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                        if piece:
                            if first is None:
                                first = time.monotonic()
                            pieces += 1
                            text.append(delta.get("content") or "")
                    usage = chunk.get("usage") or usage
                    timings = chunk.get("timings") or timings
                resp.read()  # the rest, so the connection can be used again
        except (OSError, http.client.HTTPException, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
            if self.conn:
                self.conn.close()
            self.conn = None
        done = time.monotonic()
        t = self.tally
        counted = self.measure_from <= done <= self.measure_to
        if error is not None:
            t.last_error = error
            if counted:
                t.errors += 1
            # Not a busy loop against a failing server: wait for the next frame.
            time.sleep(min(self.args.frame_period, max(0.0, self.measure_to - time.monotonic())))
            return
        answer = "".join(text).strip()
        if answer and not is_skip(answer):
            self.last_comment = answer
        if not counted:
            return
        t.cycles += 1
        t.pieces += pieces
        t.cycle_ms.append((done - sent) * 1e3)
        if first is not None:
            t.first_token_ms.append((first - self.captured(newest)) * 1e3)
            t.request_first_token_ms.append((first - sent) * 1e3)
        if "prompt_tokens" in usage:
            t.prompt_tokens.append(usage["prompt_tokens"])
        if "prompt_n" in timings:
            t.prompt_evaluated.append(timings["prompt_n"])


def run_n(n, args, urls):
    start = time.monotonic()
    measure_from = start + args.warmup
    measure_to = measure_from + args.seconds
    streams = [
        Stream(i, args, urls, start, measure_from, measure_to, args.print_request and i == 0)
        for i in range(n)
    ]
    for s in streams:
        s.start()
    for s in streams:
        # A request in flight at the end may run to its timeout; it is not counted.
        s.join(timeout=max(0.0, measure_to - time.monotonic()) + args.timeout + 5)
    tallies = [s.tally for s in streams]
    rates = [t.cycles / args.seconds for t in tallies]
    flat = lambda key: [v for t in tallies for v in getattr(t, key)]  # noqa: E731
    mean = lambda v: (sum(v) / len(v)) if v else None  # noqa: E731
    errors = [t.last_error for t in tallies if t.last_error]
    return {
        "streams": n,
        "cycles_per_s_mean": sum(rates) / n,
        "cycles_per_s_min": min(rates),
        "first_token_ms": percentiles(flat("first_token_ms")),
        "request_first_token_ms": percentiles(flat("request_first_token_ms")),
        "cycle_ms": percentiles(flat("cycle_ms")),
        "decode_tokens_per_s": sum(t.pieces for t in tallies) / args.seconds,
        "errors": sum(t.errors for t in tallies),
        "prompt_tokens_mean": mean(flat("prompt_tokens")),
        "prompt_evaluated_mean": mean(flat("prompt_evaluated")),
        "last_error": errors[0] if errors else None,
    }


HEADER = (
    "| streams | cycles/s per stream (min) | newest frame -> first token ms p50 / p95 "
    "| request -> first token ms p50 / p95 | cycle ms p50 / p95 | tokens/s (all) | errors |\n"
    "|---------|------------------|-------------------|-------------------|-------------------|----------|--------|"
)


def row(r):
    def cell(p):
        return "      - / -      " if p is None else f"{p['p50']:>7.0f} / {p['p95']:>7.0f}"

    return (
        f"| {r['streams']:>7} | {r['cycles_per_s_mean']:>6.2f} ({r['cycles_per_s_min']:>4.2f}) "
        f"| {cell(r['first_token_ms'])} | {cell(r['request_first_token_ms'])} | {cell(r['cycle_ms'])} "
        f"| {r['decode_tokens_per_s']:>8.0f} | {r['errors']:>6} |"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("frames_files", nargs="+", metavar="JPEG", help="frames, used in turn")
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--prompt", required=True, metavar="JSON",
                    help="the prompt text, from `kibitz bench --print-prompt`")
    ap.add_argument("--model", default="kibitz-peer", help="the request's model field")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--streams", default="1", help="stream counts, comma-separated")
    ap.add_argument("--seconds", type=float, default=12, help="measured seconds per count")
    ap.add_argument("--warmup", type=float, default=4, help="seconds before measuring")
    ap.add_argument("--max-tokens", type=int, default=30)
    ap.add_argument("--frames", type=int, default=4, help="frames a request")
    ap.add_argument("--frame-period", type=float, default=1.0, help="seconds between sampled frames")
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    ap.add_argument("--timeout", type=float, default=60, help="seconds a request may take")
    ap.add_argument("--json-out", default=None, help="also write the JSON list here")
    ap.add_argument("--print-request", action="store_true", help="print stream 0's first request (images cut)")
    args = ap.parse_args()
    args.prompt_text = load_prompt(args.prompt)
    try:
        counts = [int(c) for c in args.streams.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"--streams takes counts like 1,8,16, not {args.streams!r}")
    if not counts or min(counts) < 1:
        raise SystemExit("--streams takes counts of at least 1")
    urls = []
    for path in args.frames_files:
        with open(path, "rb") as f:
            urls.append("data:image/jpeg;base64," + base64.b64encode(f.read()).decode())
    print(
        f"peer: {args.url}, streams {counts}, {args.seconds:g} s each after {args.warmup:g} s warm-up, "
        f"{args.frames} frames a request from {len(urls)} files, up to {args.max_tokens} tokens a cycle",
        file=sys.stderr,
    )
    results = []
    for n in counts:
        r = run_n(n, args, urls)
        results.append(r)
        print(f"peer {n} streams: {row(r)}", file=sys.stderr)
        if r["last_error"]:
            print(f"peer {n} streams: last error: {r['last_error']}", file=sys.stderr)
        print("peer-streams " + json.dumps(r), flush=True)
    print(f"\n{args.url}: live streams at one frame a second, up to {args.max_tokens} tokens a cycle\n")
    print(HEADER)
    for r in results:
        print(row(r))
    print(json.dumps(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
