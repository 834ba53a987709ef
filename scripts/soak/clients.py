#!/usr/bin/env python3
"""Many long-lived viewers of a kibitz server, in one process, for scripts/soak.sh.

One asyncio task per client, each on a raw socket (no third-party package): SSE readers
(`/api/streams/{id}/stream`, every fourth with `?sound=on` so speech is made), WebSocket
readers (`/api/streams/{id}/ws`; pings answered, frames counted), Motion JPEG readers
(`/api/streams/{id}/mjpeg`) and speech readers (`/api/streams/{id}/speech`, Ogg/Opus).
Clients are spread over the streams in turn. Each one lives a random 0.5x-1.5x of
`--lifetime` seconds, then closes and connects again, so connections are opened and
closed all through the soak as well as held (0: held until the end). A refused or broken
connection is counted and retried after a second.

Every `--report` seconds one JSON line goes to stdout: clients connected now by kind,
connections opened, errors, bytes and messages read. 200 clients of a few frames a second
cost well under a core here; curl processes would cost a process each.

Usage: clients.py --base http://127.0.0.1:8199 --streams s1,s2 --sse 50 --ws 50 --mjpeg 100
"""
import argparse
import asyncio
import base64
import json
import os
import random
import sys
import time
from urllib.parse import urlsplit

KINDS = ("sse", "ws", "mjpeg", "speech")


class Meter:
    """Counts per kind; the one place the report reads."""

    def __init__(self):
        self.connected = dict.fromkeys(KINDS, 0)
        self.opened = dict.fromkeys(KINDS, 0)
        self.errors = dict.fromkeys(KINDS, 0)
        self.bytes = dict.fromkeys(KINDS, 0)
        self.messages = dict.fromkeys(KINDS, 0)
        self.last_error = ""

    def line(self):
        return json.dumps(
            {
                "t": round(time.time()),
                "connected": self.connected,
                "opened": self.opened,
                "errors": self.errors,
                "bytes": self.bytes,
                "messages": self.messages,
                "last_error": self.last_error,
            },
            separators=(",", ":"),
        )


async def open_http(host, port, path, token, extra=b""):
    """Connects and sends one GET; returns (reader, writer, status, headers)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    try:
        auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
            + auth
            + extra
            + b"\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except BaseException:
        # A server too slow to answer: this viewer gives up and closes, as a browser would
        # (the socket would otherwise stay open in the event loop, held by nobody).
        writer.close()
        raise
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for h in header_lines:
        if ":" in h:
            k, v = h.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return reader, writer, status, headers


class Done(Exception):
    """The connection's lifetime is over: close it as a viewer leaving would."""


async def until(deadline, awaitable, silence=60):
    """Awaits up to the lifetime's end, and up to `silence` seconds of the server saying
    nothing (None: events may pause for as long as no comment comes)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        awaitable.close()
        raise Done
    try:
        return await asyncio.wait_for(awaitable, min(silence or remaining, remaining))
    except asyncio.TimeoutError:
        if time.monotonic() >= deadline - 0.01:
            raise Done from None
        raise


async def read_stream(reader, meter, kind, deadline, separator):
    """Reads a response body until the deadline, counting bytes and messages."""
    while True:
        # MJPEG and speech never pause; SSE has its keep-alive comments.
        chunk = await until(deadline, reader.read(65536), 60)
        if not chunk:
            raise ConnectionError("closed by the server")
        meter.bytes[kind] += len(chunk)
        meter.messages[kind] += chunk.count(separator)


async def read_ws(reader, writer, meter, deadline):
    """Reads WebSocket frames (unmasked from the server) until the deadline; answers
    pings with a masked pong, and a close with a close."""
    while True:
        # The server sends no pings: a WebSocket is quiet until the next event.
        head = await until(deadline, reader.readexactly(2), None)
        opcode = head[0] & 0x0F
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(length)
        meter.bytes["ws"] += 2 + length
        if opcode == 0x9:
            writer.write(ws_frame(0xA, payload))
            await writer.drain()
        elif opcode == 0x8:
            writer.write(ws_frame(0x8, payload[:2]))
            await writer.drain()
            raise ConnectionError("websocket closed by the server")
        elif opcode in (0x1, 0x2):
            meter.messages["ws"] += 1


def ws_frame(opcode, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def one_connection(kind, host, port, stream, token, meter, deadline, listener):
    if kind == "ws":
        key = base64.b64encode(os.urandom(16))
        extra = (
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n"
        )
        path = f"/api/streams/{stream}/ws"
    elif kind == "sse":
        extra = b"Accept: text/event-stream\r\n"
        path = f"/api/streams/{stream}/stream" + ("?sound=on" if listener else "")
    else:
        extra = b""
        path = f"/api/streams/{stream}/{kind}"
    reader, writer, status, _ = await open_http(host, port, path, token, extra)
    try:
        wanted = 101 if kind == "ws" else 200
        if status != wanted:
            raise ConnectionError(f"{kind} {path}: HTTP {status}")
        meter.opened[kind] += 1
        meter.connected[kind] += 1
        try:
            if kind == "ws":
                await read_ws(reader, writer, meter, deadline)
            else:
                separator = {"sse": b"\n\n", "mjpeg": b"--", "speech": b"OggS"}[kind]
                await read_stream(reader, meter, kind, deadline, separator)
        except Done:
            pass
        finally:
            meter.connected[kind] -= 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def client(kind, host, port, stream, token, meter, lifetime, end, listener):
    while time.monotonic() < end:
        life = lifetime * random.uniform(0.5, 1.5) if lifetime > 0 else end
        deadline = min(end, time.monotonic() + life)
        try:
            await one_connection(kind, host, port, stream, token, meter, deadline, listener)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
            meter.errors[kind] += 1
            meter.last_error = f"{kind} {stream}: {type(e).__name__}: {e}"[:200]
            await asyncio.sleep(1)


async def report(meter, every, end):
    while time.monotonic() < end:
        await asyncio.sleep(every)
        print(meter.line(), flush=True)


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--streams", required=True, help="comma-separated stream ids")
    p.add_argument("--token", default=os.environ.get("KIBITZ_TOKEN", ""))
    p.add_argument("--sse", type=int, default=50)
    p.add_argument("--ws", type=int, default=50)
    p.add_argument("--mjpeg", type=int, default=100)
    p.add_argument("--speech", type=int, default=4)
    p.add_argument("--lifetime", type=float, default=120, help="seconds; 0 = held")
    p.add_argument("--seconds", type=float, default=3600)
    p.add_argument("--report", type=float, default=30)
    a = p.parse_args()
    url = urlsplit(a.base)
    host, port = url.hostname, url.port or 80
    streams = a.streams.split(",")
    meter = Meter()
    end = time.monotonic() + a.seconds
    tasks = []
    counts = {"sse": a.sse, "ws": a.ws, "mjpeg": a.mjpeg, "speech": a.speech}
    for kind in KINDS:
        for i in range(counts[kind]):
            stream = streams[i % len(streams)]
            listener = kind == "sse" and i % 4 == 0
            tasks.append(client(kind, host, port, stream, a.token, meter, a.lifetime, end, listener))
    # Spread the first connections over a few seconds, as viewers arrive.
    async def staggered(i, coro):
        await asyncio.sleep(i * 0.02)
        await coro

    await asyncio.gather(report(meter, a.report, end), *(staggered(i, t) for i, t in enumerate(tasks)))
    print(meter.line(), flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
