"""The report as a person sees it: opened in headless Chromium with the network cut off, every chart must draw
(SVG marks in the DOM), nothing may be logged to the console, and the page must make no network request.
The PNG exports must be real pictures (sized, not blank).

Chromium is Debian's package (``apt-get install chromium``, done by .ci/run); without it the browser tests skip.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_report import synthetic_tables

from ilr_inspect.reporting import build_report

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
# A dead proxy: any request that escapes the page's Content-Security-Policy fails instead of leaving the machine.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from test_report import _equilibrium_dir  # equilibrium results too, so every chart kind is exercised

    from ilr_inspect.reporting import load_equilibrium

    folder = tmp_path_factory.mktemp("page")
    tables = synthetic_tables(n_ckpt=40, n_units=30)
    tables.equilibrium, tables.equilibrium_meta, tables.equilibrium_curves = load_equilibrium(
        _equilibrium_dir(folder))
    import pandas as pd

    assert tables.norms is not None
    steps = sorted(tables.norms["step"].unique())[::8]
    tables.distance = pd.DataFrame([{"step_a": a, "step_b": b, "disagreement": abs(a - b) / 4000, "tv": 0.0}
                                    for i, a in enumerate(steps) for b in steps[i + 1:]])
    result = build_report(tables, folder / "report.html")
    from ilr_inspect.reporting.charts import BUILDERS

    assert len(result.figures) == len(BUILDERS)  # every chart kind the report has
    return folder / "report.html", result.figures


def _dump_dom(path: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after the page settled (virtual time), and every console line Chromium logged for it. A request
    blocked by the page's Content-Security-Policy is logged there too."""
    proc = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=20000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.browser
@needs_chromium
def test_dump_dom_every_chart_drawn_no_console_output(page: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, figures = page
    dom, console = _dump_dom(path, tmp_path / "profile")
    assert f'data-charts-done="{len(figures)}"' in dom
    for name in figures:
        start = dom.index(f'id="chart-{name}"')
        container = dom[start:dom.find("</figure>", start)]
        assert 'data-rendered="true"' in container, name
        assert "<svg" in container and 'class="mark-' in container, name
    assert not re.search(r'<body[^>]*data-errors=', dom)  # window.onerror recorded nothing
    assert console == []  # no errors, no Vega warnings, no blocked request, nothing


@pytest.mark.browser
@needs_chromium
def test_dump_dom_check_catches_a_request(page: tuple[Path, list[str]], tmp_path: Path) -> None:
    # Negative control without DevTools: a remote image in the page shows up as a console line.
    html = page[0].read_text(encoding="utf-8")
    cut = html.rfind("</body>")
    bad = tmp_path / "bad.html"
    bad.write_text(html[:cut] + '<img src="http://example.com/x.png">' + html[cut:], encoding="utf-8")
    _, console = _dump_dom(bad, tmp_path / "profile")
    assert any("example.com/x.png" in line for line in console)


async def _cdp_session(url: str, user_dir: Path, timeout: float = 90) -> dict[str, Any]:
    """Drive Chromium over the DevTools protocol: record every network request and console/log entry while the
    page loads, then read back what each chart container holds."""
    import aiohttp

    proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={user_dir}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = user_dir / "DevToolsActivePort"
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as http:
            for _ in range(50):
                async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = [t for t in await resp.json() if t.get("type") == "page"]
                if targets:
                    break
                await asyncio.sleep(0.1)
            events: dict[str, Any] = {"requests": [], "console": [], "exceptions": [], "log": []}
            async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                counter = 0
                replies: dict[int, Any] = {}

                async def call(method: str, **params: Any) -> Any:
                    nonlocal counter
                    counter += 1
                    mine = counter
                    await ws.send_str(json.dumps({"id": mine, "method": method, "params": params}))
                    while mine not in replies:
                        msg = json.loads((await ws.receive(timeout=timeout)).data)
                        if "id" in msg:
                            replies[msg["id"]] = msg
                        elif msg["method"] == "Network.requestWillBeSent":
                            events["requests"].append(msg["params"]["request"]["url"])
                        elif msg["method"] == "Runtime.consoleAPICalled":
                            events["console"].append(msg["params"])
                        elif msg["method"] == "Runtime.exceptionThrown":
                            events["exceptions"].append(msg["params"])
                        elif msg["method"] == "Log.entryAdded":
                            events["log"].append(msg["params"]["entry"])
                    return replies.pop(mine).get("result")

                for domain in ("Network", "Runtime", "Log", "Page"):
                    await call(f"{domain}.enable")
                await call("Page.navigate", url=url)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                done = None
                while done is None and loop.time() < deadline:
                    await asyncio.sleep(0.2)
                    res = await call("Runtime.evaluate", returnByValue=True,
                                     expression="document.body && document.body.getAttribute('data-charts-done')")
                    done = res["result"].get("value")
                probe = """JSON.stringify(Array.from(document.querySelectorAll('.chart')).map(el => ({
                    name: el.dataset.chart, rendered: el.getAttribute('data-rendered'),
                    svg: el.querySelectorAll('svg').length,
                    marks: el.querySelectorAll('svg g.mark-line path, svg g.mark-symbol path, svg g.mark-rect path,'
                                               + ' svg g.mark-area path, svg g.mark-rule line').length})))"""
                res = await call("Runtime.evaluate", expression=probe, returnByValue=True)
                events["charts"] = json.loads(res["result"]["value"])
                events["done"] = done
        return events
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.browser
@needs_chromium
def test_devtools_no_network_no_console_all_marks(page: tuple[Path, list[str]], tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    path, figures = page
    events = asyncio.run(_cdp_session(path.as_uri(), tmp_path / "profile"))
    assert events["done"] == str(len(figures))
    assert sorted(c["name"] for c in events["charts"]) == sorted(figures)
    for chart in events["charts"]:
        assert chart["rendered"] == "true" and chart["svg"] >= 1 and chart["marks"] > 0, chart
    # The only resource the page loads is itself: no CDN, no fonts, no data fetches.
    assert [u for u in events["requests"] if u != path.as_uri()] == []
    assert events["console"] == [] and events["exceptions"] == []
    assert [e for e in events["log"] if e.get("level") in ("error", "warning")] == []


def test_png_exports_are_real_pictures(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    result = build_report(synthetic_tables(n_ckpt=30, n_units=8), tmp_path / "r.html", png_dir=tmp_path / "png")
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(result.figures)
    for p in pngs:
        with image.open(p) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200, (p.name, im.size)
            pixels = np.asarray(im.convert("L"), dtype=np.float64)
        assert pixels.var() > 0, p.name
        background = np.bincount(pixels.astype(np.int64).ravel()).argmax()
        assert (pixels != background).mean() > 0.01, p.name  # more than a blank canvas with a stray pixel


@pytest.mark.browser
@needs_chromium
def test_devtools_harness_catches_a_page_that_calls_home(page: tuple[Path, list[str]], tmp_path: Path) -> None:
    # Negative control: the same checks must flag a page that loads a remote image and fetches a script.
    pytest.importorskip("aiohttp")
    html = page[0].read_text(encoding="utf-8")
    cut = html.rfind("</body>")
    bad = tmp_path / "bad.html"
    bad.write_text(html[:cut] + '<img src="http://example.com/x.png"><script>fetch("https://cdn.example.org/a.js")'
                   ".catch(function () {})</script>" + html[cut:], encoding="utf-8")
    events = asyncio.run(_cdp_session(bad.as_uri(), tmp_path / "profile"))
    assert "http://example.com/x.png" in events["requests"]
    assert any("cdn.example.org" in e.get("text", "") for e in events["log"] if e.get("level") == "error")
