"""The documentation: the site builds with --strict (as `make docs` does), and the README stays a short read whose links hold."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO

README = REPO / "README.md"
# a Markdown link or image whose target is a path in the repository (not a URL, not an anchor)
LOCAL_LINK = re.compile(r"!?\[[^\]]*\]\((?!https?://|#|mailto:)([^)#\s]+)")


def test_site_builds_strict_with_the_api_from_the_docstrings(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed (pip install -e '.[docs]' if mkdocs is missing):\n{done.stderr[-4000:]}"
    api = (site / "api" / "index.html").read_text()
    for name in (
        "pneumoscope.api.load",
        "pneumoscope.api.Model",
        "pneumoscope.api.CamMap",
        "pneumoscope.inference.prediction.Prediction",
        "pneumoscope.errors.PneumoscopeError",
    ):
        assert f'id="{name}"' in api, f"{name} is not documented on the API page"
    assert "Returns" in api and "Raises" in api  # the docstrings' sections were parsed, not shown as text
    assert ":class:" not in api and ":func:" not in api  # Sphinx roles shown as code (docs/griffe_roles.py)
    first_measurement = next(line[3:] for line in (REPO / "BENCHMARKS.md").read_text().splitlines() if line.startswith("## "))
    assert first_measurement.split("`")[0].strip() in (site / "benchmarks" / "index.html").read_text()  # BENCHMARKS.md included
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 9
    fetched = [p.name for p in pages if "fonts.googleapis.com" in p.read_text() or "fonts.gstatic.com" in p.read_text()]
    assert not fetched, f"pages that load web fonts (theme: font: false keeps them offline): {fetched}"


def test_readme_is_a_short_read_whose_links_and_pictures_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 150, "the README is the two-minute read: the reference belongs in docs/"
    targets = LOCAL_LINK.findall(text)
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    pictures = [REPO / t for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)]
    assert len(pictures) >= 2  # the report and the web page
    for picture in pictures:
        assert picture.suffix == ".png" and picture.stat().st_size < 300_000, f"{picture}: {picture.stat().st_size} bytes"
    # .ci/run runs the README's test commands
    assert "make test-all" in text and re.search(r"`make test`", text)


def test_package_is_marked_typed():
    from importlib.resources import files

    assert (files("pneumoscope") / "py.typed").is_file()
