"""``lovd image build``: build session images with the project's offline build scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lovd.config import Config

TEST_IMAGE = "localhost/lovd-test:latest"


def packaging_dir() -> Path:
    """The build scripts: next to the package in a source checkout, else installed data."""
    candidates = [
        os.environ.get("LOVD_PACKAGING_DIR", ""),
        str(Path(__file__).resolve().parent.parent / "packaging"),
        "/usr/share/lovd/packaging",
    ]
    for c in candidates:
        if c and (Path(c) / "images").is_dir():
            return Path(c)
    raise FileNotFoundError(
        "image build scripts not found; set LOVD_PACKAGING_DIR to the project's packaging/ dir"
    )


def build(config: Config, *, test: bool = False, tag: str | None = None) -> int:
    if os.geteuid() == 0:
        print(
            "lovd: build images as the lovd user (its rootless Podman store is the one "
            "lovd uses): runuser -u lovd -- lovd image build",
            file=sys.stderr,
        )
        return 2
    try:
        script = packaging_dir() / "images" / ("test" if test else "opencode") / "build.sh"
    except FileNotFoundError as e:
        print(f"lovd: {e}", file=sys.stderr)
        return 2
    image = tag or (TEST_IMAGE if test else config.image)
    env = dict(os.environ, LOVD_PODMAN=config.podman)
    return subprocess.call(["bash", str(script), image], env=env)
