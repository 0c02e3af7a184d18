"""Headless Chromium driven over the DevTools protocol with a stdlib websocket (no Selenium, no extra package).

``open_page(html_path)`` starts a fresh Chromium (own ``--user-data-dir``), loads the page at 1280x2000, and returns
what the browser saw: console errors / exceptions / CSP violations, the result of a layout probe, and a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from helpers.procs import stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars", "--mute-audio"]

# layout facts the test checks: every number comes from the rendered page
PROBE = r"""
(() => {
  const vis = (el) => { const r = el.getBoundingClientRect(), s = getComputedStyle(el);
    return {w: r.width, h: r.height, top: r.top + scrollY, visible: r.width > 0 && r.height > 0 &&
            s.visibility !== 'hidden' && s.display !== 'none' && parseFloat(s.opacity) > 0}; };
  return {
    title: document.title,
    innerHeight: innerHeight,
    verdicts: [...document.querySelectorAll('.verdict')].map(el => ({...vis(el), text: el.innerText})),
    findings: [...document.querySelectorAll('.finding')].map(el => ({...vis(el), id: el.id, signature: el.dataset.signature, text: el.innerText})),
    plots: [...document.querySelectorAll('img.plot')].map(el => ({...vis(el), name: el.dataset.plot, complete: el.complete,
            naturalWidth: el.naturalWidth, naturalHeight: el.naturalHeight})),
    links: [...document.querySelectorAll('[src],[href]')].map(el => el.getAttribute('src') || el.getAttribute('href')),
  };
})()
"""


class _WebSocket:
    """The smallest RFC 6455 client the DevTools protocol needs: masked text frames out, (fragmented) frames in."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return bytes(buf)

    def send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        header = bytes([0x81])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            data = self._recv_exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x9, 0xA):  # ping/pong: not used by DevTools
                continue
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


class _Cdp:
    def __init__(self, ws: _WebSocket) -> None:
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method: str, **params):
        self.next_id += 1
        my = self.next_id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 20.0) -> dict:
        end = time.monotonic() + timeout
        for e in self.events:
            if e["method"] == name:
                return e
        while time.monotonic() < end:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == name:
                    return msg
        raise TimeoutError(name)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')} at {d.get('url')}:{d.get('lineNumber')}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + json.dumps(p.get("args", []))[:300])
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append("log: " + p["entry"].get("text", "")[:300])
    return out


def open_page(html_path: Path, *, width: int = 1280, height: int = 2000) -> dict:
    """Load ``html_path`` in a fresh headless Chromium; return ``{errors, probe, screenshot(bytes)}``."""
    assert CHROMIUM, "chromium is not installed"
    with tempfile.TemporaryDirectory(prefix="autopsy-chromium-") as profile:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            end = time.monotonic() + 30
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                if time.monotonic() > end or proc.poll() is not None:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.05)
            port = int(port_file.read_text().splitlines()[0])
            while True:  # the port file can appear before the page target is ready: retry until the deadline
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                        page = next(t for t in json.load(r) if t.get("type") == "page")
                    ws = _WebSocket(page["webSocketDebuggerUrl"])
                    break
                except (OSError, StopIteration, ValueError):
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.1)
            try:
                cdp = _Cdp(ws)
                for domain in ("Runtime", "Log", "Page"):
                    cdp.call(f"{domain}.enable")
                cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
                cdp.events.clear()
                cdp.call("Page.navigate", url=html_path.resolve().as_uri())
                cdp.wait_event("Page.loadEventFired")
                probe = cdp.call("Runtime.evaluate", expression=PROBE, returnByValue=True)["result"]["value"]
                shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
                cdp.call("Runtime.evaluate", expression="0")  # drain late events
                return {"errors": _errors(cdp.events), "probe": probe, "screenshot": shot}
            finally:
                ws.close()
        finally:
            stop(proc)
