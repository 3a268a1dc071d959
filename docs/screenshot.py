"""Screenshot a page of a running UI with headless Chromium (how the PNGs in docs/ were taken).

    .venv/bin/python docs/screenshot.py URL OUT.png [--click TEXT ...] [--wait SECONDS] [--size 1400x1000]

Chromium (Debian's ``chromium``) is driven over the DevTools protocol: open the page, wait, click
each button whose visible text is TEXT (in order: opening a dialog, unfolding a section), wait
again, and save a PNG. Nothing is sent anywhere but the page's own server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]

# Clicks the innermost button-like element whose text is exactly the argument; returns whether it found one.
_CLICK = """(text => {
  const els = [...document.querySelectorAll('button, [role=button], [role=tab], a, summary, label')];
  const el = els.find(e => e.innerText && e.innerText.trim() === text)
          || els.find(e => e.innerText && e.innerText.trim().startsWith(text));
  if (!el) return false;
  el.scrollIntoView({block: 'center'}); el.click(); return true;
})(%s)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _shoot(ws_url: str, url: str, out: Path, clicks: list[str], wait: float, size: tuple[int, int]) -> None:
    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        ids = iter(range(1, 10**6))

        async def call(method: str, **params):
            msg_id = next(ids)
            await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == msg_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                   mobile=False)
        await call("Page.enable")
        await call("Page.navigate", url=url)
        await asyncio.sleep(wait)
        for text in clicks:
            found = (await call("Runtime.evaluate", expression=_CLICK % json.dumps(text),
                                returnByValue=True))["result"].get("value")
            if not found:
                raise SystemExit(f"no clickable element with text {text!r} on {url}")
            await asyncio.sleep(wait / 2)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> None:
    """Parse the arguments, start Chromium, take the screenshot, stop Chromium."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--click", action="append", default=[], help="text of a button to click (repeatable)")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds to let the page render")
    parser.add_argument("--size", default="1400x1000")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("chromium not found (apt-get install chromium)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="corpusforge-chromium-") as profile:
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as reply:
                        pages = [p for p in json.load(reply) if p.get("type") == "page"]
                    if pages:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("chromium did not start")
                time.sleep(0.5)
            asyncio.run(_shoot(pages[0]["webSocketDebuggerUrl"], args.url, args.out, args.click, args.wait, size))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(args.out)


if __name__ == "__main__":
    main()
