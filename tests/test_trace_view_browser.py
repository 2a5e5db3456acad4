"""The view's page in a real browser: headless Chromium opens it from disk with every host unresolvable, its
script runs to the end without a console message, the screenshot is not blank, and the URL fragment's head
re-shades the steps and its step is explained. Skipped when no Chromium is installed (``.ci/run`` installs Debian's ``chromium``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from kfh_probe.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
BROWSER = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason=f"no Chromium found (looked for {', '.join(BROWSERS)}): the browser test is skipped; "
    "install Debian's chromium (apt-get install -y chromium) to run it")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium offline (every host resolves to nothing) with console messages on stderr."""
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def _step_shades(dom: str) -> list[str]:
    return re.findall(r'<span class="kfh-step [^"]*"[^>]*style="background-color: ([^"]+);"', dom)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("view") / "view.html"
    assert main(["view", "--max-traces", "5", "--out", str(out), "--quiet"]) == 0
    return out


def test_the_page_runs_offline_without_a_console_message_and_a_head_reshades_it(page, tmp_path):
    doms = {}
    for head in ("ens", "0.0"):
        run = _chromium(tmp_path / "profile", "--dump-dom", f"{page.as_uri()}#trace=organism-model-0-2&head={head}&step=6")
        assert [line for line in run.stderr.splitlines() if ":CONSOLE" in line] == []
        doms[head] = run.stdout
        assert 'data-ready="1"' in run.stdout and 'data-error="' not in run.stdout
    ensemble, single = _step_shades(doms["ens"]), _step_shades(doms["0.0"])
    assert len(ensemble) == len(single) == page.read_text(encoding="utf-8").count('tabindex="0"')
    assert ensemble != single  # layer 0 head 0 ranks the steps differently from the top-5 ensemble
    assert re.search(r"L0\.H0 ranks \d+ of \d+ essential-redundant pairs right", doms["0.0"])
    assert re.search(r"Trace organism-model-0-2, step 6 of 6: redundant</p><p>L0\.H0: score [0-9.e-]+, rank \d of 6",
                     doms["0.0"])  # the fragment's step=6 is explained as hovering it would


@pytest.mark.parametrize("width", [1280, 390])
def test_the_screenshot_is_not_blank_at_desktop_and_phone_width(page, tmp_path, width):
    shot = tmp_path / "shot.png"
    _chromium(tmp_path / "profile", f"--window-size={width},900", f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        assert image.size == (width, 900)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 10
