#!/usr/bin/python3
"""A live RTSP test camera for scripts/soak.sh: a moving test pattern as Motion JPEG over
RTP, served by GStreamer's RTSP server (Debian: gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-good) at rtsp://127.0.0.1:PORT/live.

The soak kills and restarts this process to make the camera drop; the pattern is live
(`is-live=true`), so a reconnect sees the present, as with a real camera. Motion JPEG
needs no encoder outside plugins-good.

Usage: rtsp-server.py PORT
"""
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = (
    "( videotestsrc is-live=true pattern=ball "
    "! video/x-raw,format=I420,width=320,height=240,framerate=10/1 "
    "! jpegenc quality=70 ! rtpjpegpay name=pay0 pt=26 )"
)


def main() -> None:
    port = sys.argv[1] if len(sys.argv) > 1 else "8554"
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    # One pipeline for every client, as a camera has one sensor.
    factory.set_shared(True)
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        sys.exit(f"rtsp-server: cannot listen on 127.0.0.1:{port}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print(f"rtsp-server: rtsp://127.0.0.1:{port}/live", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
