"""Install the scripts that `dvc plots show`'s page runs (vega, vega-lite, vega-embed) into a local folder, so
the page draws with no network: .dvc/plots_template.html loads them from there instead of a CDN.

The versions are the ones DVC's own page loads from jsdelivr (dvc_render's VegaRenderer.SCRIPTS); each
tarball comes from the npm registry (NPM_CONFIG_REGISTRY for a mirror) and must match the sha512 integrity
pinned here, taken from the registry's metadata. Only each package's build/<name>.min.js is kept.

Usage: python tools/plots_js.py DEST_DIR
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from persona_lm.io import atomic_path

PINS = {
    "vega": ("5.20.2",
              "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    "vega-lite": ("5.2.0",
                   "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    "vega-embed": ("6.18.2",
                    "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
}


class FetchError(Exception):
    pass


def tarball_url(name: str, version: str) -> str:
    registry = (os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry")
                or "https://registry.npmjs.org")
    return f"{registry.rstrip('/')}/{name}/-/{name}-{version}.tgz"


def check_integrity(data: bytes, integrity: str, what: str) -> None:
    algo, _, expected = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != expected:
        raise FetchError(f"{what}: {algo} is {got}, expected {expected} (pinned in tools/plots_js.py)")


def extract_min_js(data: bytes, name: str) -> bytes:
    member = f"package/build/{name}.min.js"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        try:
            f = tar.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise FetchError(f"{name}: the tarball has no {member}")
        return f.read()


def install(dest: Path, fetch=lambda url: urllib.request.urlopen(url, timeout=60).read()) -> list[Path]:
    written = []
    for name, (version, integrity) in PINS.items():
        url = tarball_url(name, version)
        try:
            data = fetch(url)
        except (urllib.error.URLError, OSError) as e:
            raise FetchError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
        check_integrity(data, integrity, url)
        with atomic_path(dest / f"{name}.min.js") as tmp:
            tmp.write_bytes(extract_min_js(data, name))
        written.append(dest / f"{name}.min.js")
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    try:
        for path in install(Path(argv[0])):
            print(f"installed {path}")
    except FetchError as e:
        print(f"error: {e}\nThe offline `dvc plots show` page needs vega, vega-lite and vega-embed from the npm "
              "registry once; check the network or set NPM_CONFIG_REGISTRY to a mirror, then rerun make.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
