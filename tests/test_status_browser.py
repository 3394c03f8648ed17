"""The status page in a real browser: Debian's chromium and chromium-driver,
driven headless by selenium, against the real admin endpoint, tunnel server
and tunnel client of tests/test_admin_api.py's AdminEnv.

selenium's calls block, and the server they talk to runs on this process's
reactor, so every browser call runs in the reactor's thread pool
(``deferToThread``) while the reactor goes on serving.  Waits are
WebDriverWait polls with a bound, never fixed sleeps.  One browser for the
module; skipped, saying why, where chromium or chromedriver is missing.
"""

from __future__ import annotations

import base64
import shutil
import tempfile

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tunnel.koding.identifiers import TunnelKey

from .admin_env import HOST, IDENT, TOKEN, AdminEnv

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "the status page tests need Debian's chromium and chromium-driver"
        " (apt-get install chromium chromium-driver; .ci/run installs them)",
        allow_module_level=True,
    )

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

#: seconds a wait for what the page shows may take (the page refreshes every 2 s)
WAIT = 20


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.TemporaryDirectory(prefix="tunnel-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile.name}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    try:
        # Basic credentials on every request, as a browser re-sends them once
        # a person typed them (URL credentials may be refused)
        credentials = base64.b64encode(b"operator:" + TOKEN).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}}
        )
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


@pytest_twisted.async_yield_fixture
async def env():
    admin = await AdminEnv().start()
    try:
        yield admin
    finally:
        await admin.stop()


# Read in one script, which runs between two of the page's refreshes: the
# page swaps its <main> every 2 s, so element handles kept across WebDriver
# calls can go stale under a test that reads them one by one.
_ROWS = """
return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr')).map(
    row => Array.from(row.querySelectorAll('td')).map(cell => cell.innerText.trim()));
"""
_TEXT = """
const element = document.getElementById(arguments[0]);
return element === null ? null : element.innerText.trim();
"""
_SHOWN = """
const element = document.getElementById(arguments[0]);
return element !== null && element.getClientRects().length > 0
    && getComputedStyle(element).visibility !== 'hidden';
"""


def rows(driver, table: str) -> list[list[str]]:
    return driver.execute_script(_ROWS, table)


def counter(driver, name: str) -> str:
    return driver.execute_script(_TEXT, f"total-{name}")


def shown(driver, element_id: str) -> bool:
    return driver.execute_script(_SHOWN, element_id)


@pytest_twisted.ensureDeferred
async def test_the_page_shows_hosts_and_tunnels_and_its_counters_move(browser, env):
    fingerprint = TunnelKey.of(IDENT).fingerprint
    await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
    await env.call("PUT", "/api/hosts/idle.localhost", {"identifier": "nobody-connects"})
    await env.connect(IDENT)

    def open_page() -> dict:
        browser.get_log("browser")  # what earlier pages left
        browser.get(env.url + "/")
        WebDriverWait(browser, WAIT).until(lambda d: rows(d, "tunnels") and rows(d, "hosts"))
        # a mark that a reload would lose: the page must refresh in place
        browser.execute_script("window.tunnelTestMark = 'still here';")
        return {
            "title": browser.title,
            "hosts": rows(browser, "hosts"),
            "tunnels": rows(browser, "tunnels"),
            "requests": counter(browser, "requests"),
            "clients": counter(browser, "clients"),
        }

    seen = await deferToThread(open_page)
    assert seen["title"] == "tunnel server"
    assert seen["hosts"] == [
        [HOST, fingerprint, "yes", "-"],
        ["idle.localhost", TunnelKey.of("nobody-connects").fingerprint, "no", "-"],
    ]
    (tunnel,) = seen["tunnels"]
    assert tunnel[0] == fingerprint and tunnel[1].startswith("127.0.0.1:")
    assert tunnel[-1] == HOST
    assert seen["clients"] == "1"
    before = int(seen["requests"])

    for n in range(5):
        assert await env.public(f"/echo?echo={n}") == (200, str(n).encode())

    def wait_for_the_counter() -> dict:
        WebDriverWait(browser, WAIT).until(
            lambda d: int(counter(d, "requests")) >= before + 5,
            message="the requests counter did not move",
        )
        return {
            "requests": counter(browser, "requests"),
            "tunnel requests": rows(browser, "tunnels")[0][3],
            "mark": browser.execute_script("return window.tunnelTestMark;"),
            "stale": shown(browser, "stale"),
            "log": browser.get_log("browser"),
        }

    moved = await deferToThread(wait_for_the_counter)
    assert int(moved["requests"]) == before + 5
    assert moved["tunnel requests"] == moved["requests"]
    assert moved["mark"] == "still here"  # refreshed in place, not reloaded
    assert moved["stale"] is False
    # nothing the Content-Security-Policy blocked, no script error
    assert [entry for entry in moved["log"] if entry["level"] == "SEVERE"] == []


@pytest_twisted.ensureDeferred
async def test_the_page_says_when_the_server_stops_answering(browser, env):
    await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})

    def open_page() -> list[list[str]]:
        browser.get(env.url + "/")
        WebDriverWait(browser, WAIT).until(lambda d: rows(d, "hosts"))
        return rows(browser, "hosts")

    assert (await deferToThread(open_page))[0][:3] == [HOST, TunnelKey.of(IDENT).fingerprint, "no"]
    await env.admin.stopService()  # the admin endpoint goes away; env.stop() copes

    def wait_for_the_note() -> str:
        WebDriverWait(browser, WAIT).until(lambda d: shown(d, "stale"))
        return browser.execute_script(_TEXT, "stale")

    assert (await deferToThread(wait_for_the_note)).startswith("not updated: ")
