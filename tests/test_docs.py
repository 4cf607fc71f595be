"""The documentation site builds strictly and documents every public name.

One `mkdocs build --strict` (about 10 s) into a temporary folder, then checks
on the HTML: each public name of the package and its public submodules has
its entry in the API reference, every link from the package's page lands on
an entry, and every image resolves. The names are read here from the
imported package, independently of how `docs/hooks/generated.py` reads them.
"""

import html
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import urllib.parse

from tests.conftest import REPO
from tests.conftest import load_docs_hook

PACKAGE = "keras_moe"
SUBMODULES = [
    "keras_moe.layers",
    "keras_moe.blocks",
    "keras_moe.routing",
    "keras_moe.callbacks",
    "keras_moe.compat",
    "keras_moe.distribution",
    "keras_moe.kerashub",
]
BUILD_TIMEOUT_S = 300


def public_names(module):
    """`module.__all__`, else the public names that `module` itself defines."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        try:
            owner = getattr(value, "__module__", None)
        except Exception:
            owner = None
        prefix = module.__name__
        if (
            isinstance(owner, str)
            and owner != prefix
            and not owner.startswith(prefix + ".")
        ):
            continue
        names.append(name)
    return names


def documented_modules():
    package = importlib.import_module(PACKAGE)
    names = [name for name in SUBMODULES if importlib.util.find_spec(name) is not None]
    for name in public_names(package):
        value = getattr(package, name)
        if inspect.ismodule(value) and value.__name__ not in names:
            names.append(value.__name__)
    return package, [importlib.import_module(name) for name in names]


def page(site, module_name):
    """The built reference page of a module."""
    relative = module_name.removeprefix(PACKAGE).strip(".") or "."
    path = site / "reference" / relative / "index.html"
    assert path.exists(), f"no API reference page for `{module_name}` ({path})"
    return path.read_text(encoding="utf-8")


def resolves(site, source, href):
    """Whether a relative link from the built page `source` lands on a file and anchor."""
    url = urllib.parse.urlsplit(html.unescape(href))
    target = (source.parent / urllib.parse.unquote(url.path)).resolve()
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file() or site.resolve() not in target.parents:
        return False
    if url.fragment:
        return f'id="{url.fragment}"' in target.read_text(encoding="utf-8")
    return True


def build(site):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed ({result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    )


def check_api_reference(site):
    package, modules = documented_modules()
    for module in modules:
        text = page(site, module.__name__)
        for name in public_names(module):
            anchor = f'id="{module.__name__}.{name}"'
            assert anchor in text, (
                f"`{module.__name__}.{name}` has no API reference entry"
            )
    index = site / "reference" / "index.html"
    text = page(site, PACKAGE)
    links = re.findall(
        r'<a [^>]*href="([^"]+)"[^>]*>\s*<code>([^<]+)</code>\s*</a>', text
    )
    for name in public_names(package):
        hrefs = [href for href, label in links if html.unescape(label) == name]
        assert hrefs, (
            f"`{PACKAGE}.{name}` is not listed on the package's reference page"
        )
        assert all(resolves(site, index, href) for href in hrefs), (
            f"the link of `{PACKAGE}.{name}` leads nowhere: {hrefs}"
        )


KERAS_SECTION_BOX = re.compile(
    r"<summary>(Call arguments|Input shape|Output shape|Examples?|References|Weights)"
)


def check_docstring_sections(site):
    # Keras's sections read as sections (docs/hooks/keras_sections.py): no `>>>`
    # quoted as Markdown, no section left to griffe's boxed admonitions.
    for path in sorted((site / "reference").rglob("*.html")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(site)
        assert "<blockquote>" not in text, f"{name}: a doctest rendered as a quote"
        box = KERAS_SECTION_BOX.search(text)
        assert box is None, f"{name}: `{box and box[1]}:` rendered as an admonition"


def check_images(site):
    pages = sorted(site.rglob("*.html"))
    images = 0
    for path in pages:
        for src in re.findall(
            r'<img [^>]*src="([^"]+)"', path.read_text(encoding="utf-8")
        ):
            if urllib.parse.urlsplit(src).scheme:
                continue
            images += 1
            assert resolves(site, path, src), (
                f"{path.relative_to(site)}: image {src} is missing"
            )
    experiment_pages = list((site / "experiments").glob("*/index.html"))
    assert experiment_pages, "no experiment pages"
    for path in experiment_pages:
        assert "<img " in path.read_text(encoding="utf-8"), f"{path}: no plot"
    assert images >= len(experiment_pages)


def check_optional_pages(site):
    # docs/multi-host.md is written elsewhere; the nav lists it once it exists.
    if (REPO / "docs" / "multi-host.md").exists():
        assert (site / "multi-host" / "index.html").exists()
        assert 'href="multi-host/"' in (site / "index.html").read_text(encoding="utf-8")


def test_docs_build_strict_and_document_every_public_name(tmp_path):
    # One build for every check: under pytest-xdist, separate tests would each build.
    site = tmp_path / "site"
    build(site)
    check_api_reference(site)
    check_docstring_sections(site)
    check_images(site)
    check_optional_pages(site)


KERAS_DOCSTRING = """Summary.

Args:
    units: Positive integer.

Call arguments:
    inputs: A tensor.
    training: Python bool.

Input shape:
    N-D tensor `(batch_size, ..., input_dim)`.

Weights: `kernel` `(d, units)`,
    `bias` `(units,)`.

Example:

>>> layer(x).shape
(2, 8)

References:
    - A paper."""

GOOGLE_DOCSTRING = """Summary.

Args:
    units: Positive integer.

Other Parameters: Call arguments:
    inputs: A tensor.
    training: Python bool.

<p><span class="doc-section-title">Input shape:</span></p>

N-D tensor `(batch_size, ..., input_dim)`.

<p><span class="doc-section-title">Weights:</span></p>

`kernel` `(d, units)`,
`bias` `(units,)`.

Examples: Example:
    >>> layer(x).shape
    (2, 8)

<p><span class="doc-section-title">References:</span></p>

- A paper."""


def test_keras_sections_become_google_sections():
    rewrite = load_docs_hook("keras_sections").rewrite
    assert rewrite(KERAS_DOCSTRING) == GOOGLE_DOCSTRING
    assert rewrite(GOOGLE_DOCSTRING) == GOOGLE_DOCSTRING
