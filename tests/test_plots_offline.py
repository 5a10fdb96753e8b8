"""`dvc plots show` draws every plot with no network: the page from the repo's .dvc/config template loads
vega, vega-lite and vega-embed from vendor/vega/ (installed by make), not from a CDN.

A tiny DVC repo in tmp_path declares the plots exactly as the real dvc.yaml does, holds dvclive curves and a
confusion file, and renders its page with the real `dvc plots show`; headless Chromium (see test_page.py)
opens it with the network emulated offline and every request recorded. DVC's default page, opened the same
way, draws nothing: the check that the network really is off and that a blank plot is caught."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import headless_chromium

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"
EMOTIONS = ["joy", "sadness", "anger"]

# Per plot div: 1 when vega drew coloured marks (lines, heatmap cells) into its svg or canvas. Axes, ticks and
# text are grey, so an empty chart frame counts 0.
DRAWN = """
return [...document.querySelectorAll('body > div[id]')].map(div => {
    const marks = div.querySelector('svg.marks, canvas.marks');  // not the actions menu's svg icon
    if (!marks) return 0;
    if (marks.tagName === 'svg')
        return [...marks.querySelectorAll('path, rect')]
            .some(e => /^#(?!888)/.test(e.getAttribute('fill') || e.getAttribute('stroke') || '')) ? 1 : 0;
    if (!marks.width || !marks.height) return 0;
    const px = marks.getContext('2d').getImageData(0, 0, marks.width, marks.height).data;
    let coloured = 0;
    for (let i = 0; i < px.length; i += 4) {
        const [r, g, b, a] = px.slice(i, i + 4);
        if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
    }
    return coloured > 50 ? 1 : 0;
});
"""


def run_dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(DVC), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def write_curves(live_dir: Path, phase: str) -> None:
    """What train/loop.py logs with dvclive, for a few steps."""
    from dvclive import Live

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for step in range(1, 7):
        live.step = step
        live.log_metric("train/loss", 4.0 / step)
        live.log_metric("lr", 1e-3)
        live.log_metric("tokens_per_s", 1000.0 + step)
        if step % 2 == 0:
            val = {"lm_loss": 4.2 / step}
            if phase == "emotion":
                val |= {"emotion_loss": 1.1 / step, "emotion_acc": 0.3 + step / 20}
            val["loss"] = val.get("emotion_loss", 0.0) + (0.5 if phase == "emotion" else 1.0) * val["lm_loss"]
            for k, v in val.items():
                live.log_metric(f"val/{k}", v)
        live.next_step()
    live.end()


def build_repo(root: Path) -> int:
    """The tiny repo with every plot the real dvc.yaml declares; returns how many plots `dvc plots show` draws."""
    vendor = ROOT / "vendor" / "vega"
    if not (vendor / "vega-embed.min.js").is_file():
        pytest.fail(f"{vendor} is not installed: run `make setup` (make test does it)")
    run_dvc(root, "init", "--no-scm", "-q")
    config = (ROOT / ".dvc" / "config").read_text()
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    template = run_dvc(ROOT, "config", "plots.html_template").strip()
    assert template, f".dvc/config sets no plots.html_template:\n{config}"
    shutil.copy(ROOT / ".dvc" / template, root / ".dvc" / template)
    (root / "vendor").mkdir()
    (root / "vendor" / "vega").symlink_to(vendor)

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {name: {"cmd": "true", "plots": s["plots"]} for name, s in stages.items() if s.get("plots")}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": declared}))
    plots = 0
    for stage in declared.values():
        for entry in stage["plots"]:
            path, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            target = root / path
            if props.get("template") == "confusion":  # one file, or a folder of them
                pairs = [{"actual": a, "predicted": p} for a in EMOTIONS for p in EMOTIONS for _ in range(1 + (a == p))]
                target = target if target.suffix else target / "example.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(pairs))
                plots += 1
            else:
                assert target.parts[-2:] == ("plots", "metrics"), f"unexpected plot declaration {path}"
                write_curves(target.parents[1], target.parts[-3])
                plots += len(list(target.rglob("*.tsv")))
    return plots


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("plots_repo")
    expected = build_repo(root)
    out = run_dvc(root, "plots", "show")
    page = root / "dvc_plots" / "index.html"
    assert page.as_uri() in out and page.is_file()
    return root, expected


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = headless_chromium(tmp_path_factory.mktemp("chrome"), "--allow-file-access-from-files",
                               performance_log=True)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    yield driver
    driver.quit()


def open_offline(driver, page: Path, want: int, timeout: float = 30) -> tuple[list[int], list[str]]:
    """Open `page`; (drawn flag per plot div once `want` have drawn or `timeout` passed, every URL requested)."""
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(page.as_uri())
    deadline = time.monotonic() + timeout
    while True:
        drawn = driver.execute_script(DRAWN)
        if sum(drawn) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return drawn, urls


def test_every_declared_plot_draws_offline(browser, plots_page):
    root, expected = plots_page
    drawn, urls = open_offline(browser, root / "dvc_plots" / "index.html", expected)
    assert expected >= 9  # 3 phases' train + val curves and the confusion matrix
    assert len(drawn) == expected and sum(drawn) == expected, \
        f"{sum(drawn)} of {len(drawn)} plot divs drew, {expected} plots declared"
    assert browser.execute_script("return document.getElementById('plots-js-missing')") is None
    assert any(u.endswith("/vendor/vega/vega-embed.min.js") for u in urls), urls
    assert all(u.startswith(("file://", "data:", "about:", "blob:")) for u in urls), urls


def test_default_dvc_page_is_blank_offline(browser, plots_page):
    """DVC's own page loads the scripts from a CDN: offline it draws nothing, which this check sees."""
    from dvc_render.html import PAGE_HTML

    root, expected = plots_page
    (root / "default.html").write_text(PAGE_HTML)
    run_dvc(root, "plots", "show", "-o", "default_plots", "--html-template", str(root / "default.html"))
    drawn, urls = open_offline(browser, root / "default_plots" / "index.html", 1, timeout=5)
    assert len(drawn) == expected and sum(drawn) == 0
    assert any(u.startswith("https://cdn.jsdelivr.net/") for u in urls), urls


def test_template_has_no_cdn_scripts():
    template = run_dvc(ROOT, "config", "plots.html_template").strip()
    html = (ROOT / ".dvc" / template).read_text()
    assert "{plot_divs}" in html and "{scripts}" not in html  # {scripts} would bring back DVC's CDN tags
    assert "http://" not in html and "https://" not in html
