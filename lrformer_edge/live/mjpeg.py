"""A small MJPEG-over-HTTP server for headless devices: open http://HOST:PORT/ in a browser.

Bound to 127.0.0.1 unless the caller names another address (exposing a camera to the network is
the user's decision). ``/`` is a page showing the stream, ``/stream`` the multipart MJPEG stream,
``/frame.jpg`` the newest frame.
"""
from __future__ import annotations

import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

BOUNDARY = "lrformerframe"
RESEND_SECONDS = 1.0
PAGE = (b"<!doctype html><html><head><title>LRFormer Edge live</title></head>"
        b"<body style='margin:0;background:#111'><img src='/stream' style='max-width:100%'>"
        b"</body></html>")


class MjpegServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 8080, quality: int = 80):
        self._jpeg: bytes | None = None
        self._sequence = 0
        self._condition = threading.Condition()
        self._closing = False
        self.quality = quality
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the demo's console for the demo
                pass

            def do_GET(self):
                if self.path in ("/", "/index.html"):
                    self._send(PAGE, "text/html")
                elif self.path == "/frame.jpg":
                    jpeg = server.wait_for_frame(0, timeout=5.0)[1]
                    if jpeg is None:
                        self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "no frame yet")
                    else:
                        self._send(jpeg, "image/jpeg")
                elif self.path == "/stream":
                    self._stream()
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)

            def _send(self, body: bytes, content_type: str):
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _stream(self):
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type",
                                 f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                seen = 0
                try:
                    while not server._closing:
                        seen, jpeg = server.wait_for_frame(seen, timeout=RESEND_SECONDS)
                        if jpeg is None:  # no new frame: repeat the last one (keeps viewers alive)
                            jpeg = server.latest()
                        if jpeg is None:
                            continue
                        self.wfile.write(
                            f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                            f"Content-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    return

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as error:
            raise ValueError(f"cannot serve on {host}:{port}: {error.strerror}") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="mjpeg", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> "MjpegServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def publish(self, rgb: np.ndarray) -> None:
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            return
        with self._condition:
            self._jpeg = encoded.tobytes()
            self._sequence += 1
            self._condition.notify_all()

    def latest(self) -> bytes | None:
        with self._condition:
            return self._jpeg

    def wait_for_frame(self, after: int, timeout: float) -> tuple[int, bytes | None]:
        """(sequence, jpeg) of a frame newer than ``after``; jpeg None on timeout/close."""
        with self._condition:
            self._condition.wait_for(lambda: self._sequence > after or self._closing, timeout)
            if self._sequence > after:
                return self._sequence, self._jpeg
            return after, None
