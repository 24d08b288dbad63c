"""Render a bundle's report.html to PNG screenshots with headless Chromium (Debian `chromium` +
`chromium-driver`), writing the report first if the bundle has none.

    python samples/report_screenshot.py BUNDLE [--out DIR] [--width 1280] [--dark]

Writes DIR/report-full.png (the whole page) and DIR/report-top.png (the first screen), and prints
the page's size in bytes and what the browser saw (console errors, network requests, images).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# An isolated, offline browser: no first-run, sync, component updates or background fetches.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--disable-dev-shm-usage")


def chromium_available() -> str | None:
    """None when headless Chromium can be driven here, else the reason it cannot."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def open_browser(user_data_dir: str, width: int = 1280, height: int = 900, dark: bool = False):
    """A headless Chromium session with console and network logging switched on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    if dark:
        options.add_argument("--force-dark-mode")
        options.add_argument("--blink-settings=preferredColorScheme=0")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def requested_urls(driver, page_uri: str) -> list[str]:
    """URLs requested for the page (its own document and whatever it loads), and any request at all
    that would leave the machine, from the DevTools network events since the log was last read.
    (Chromium's internal chrome:// pages, such as the start tab, are not the page's requests.)"""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.requestWillBeSent":
            continue
        url, document = message["params"]["request"]["url"], message["params"].get("documentURL", "")
        if document == page_uri or url == page_uri or not url.startswith(("chrome:", "chrome-", "data:", "about:")):
            urls.append(url)
    return urls


def load_page(driver, page: Path) -> dict:
    """Open `page` via file:// and report console messages, requests and image decoding."""
    driver.get_log("performance")  # drop what the blank start page did
    driver.get_log("browser")
    uri = page.resolve().as_uri()
    driver.get(uri)
    images = driver.execute_script(
        "return Array.from(document.images).map(i => ({src: i.src.slice(0, 40), complete: i.complete, "
        "w: i.naturalWidth, h: i.naturalHeight}))")
    return {"console": driver.get_log("browser"), "requests": requested_urls(driver, uri), "images": images,
            "text": driver.find_element("tag name", "body").text}


def screenshot(driver, full_png: Path, top_png: Path) -> None:
    """First screen, then the whole page (the viewport resized to the document through DevTools)."""
    driver.save_screenshot(str(top_png))
    width = driver.execute_script("return document.documentElement.scrollWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    full_png.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the bundle)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--dark", action="store_true", help="render with the browser in dark mode")
    ap.add_argument("--regenerate", action="store_true", help="write report.html again first")
    args = ap.parse_args()
    reason = chromium_available()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    page = args.bundle / "report.html"
    if args.regenerate or not page.is_file():
        from edgesvd.exporters.report import write_report

        write_report(args.bundle)
    out = args.out or args.bundle
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-dark" if args.dark else ""
    with tempfile.TemporaryDirectory(prefix="edgesvd-chromium-") as profile:
        driver = open_browser(profile, args.width, dark=args.dark)
        try:
            seen = load_page(driver, page)
            screenshot(driver, out / f"report-full{suffix}.png", out / f"report-top{suffix}.png")
        finally:
            driver.quit()
    foreign = [u for u in seen["requests"] if u != page.resolve().as_uri() and not u.startswith("data:")]
    errors = [m for m in seen["console"] if m["level"] == "SEVERE"]
    decoded = sum(1 for i in seen["images"] if i["complete"] and i["w"] > 0)
    print(f"page: {page} ({page.stat().st_size:,} bytes)")
    print(f"images decoded: {decoded}/{len(seen['images'])}; console errors: {len(errors)}; "
          f"requests other than the page and data: URIs: {len(foreign)}")
    for m in errors:
        print(f"  console: {m['message']}")
    for u in foreign:
        print(f"  request: {u}")
    print(f"screenshots: {out / f'report-top{suffix}.png'} {out / f'report-full{suffix}.png'}")
    return 0 if not errors and not foreign and decoded == len(seen["images"]) else 1


if __name__ == "__main__":
    sys.exit(main())
