"""MkDocs hooks: the parts of the site made from the package and its results.

- API reference: one page per public module (`MODULES`, plus any module that
  `keras_moe.__all__` exports), with one entry per public name, so that new
  or renamed names get documented without an edit here. A module's public
  names are its `__all__`, else the names it defines without a leading
  underscore. Read with griffe from the sources, as mkdocstrings reads them:
  nothing is imported, so the build needs no Keras backend.
- Committed results: the PNGs of `results/<name>/` are served at
  `experiments/<name>/`, beside the page that includes that folder's
  `summary.md` (so the summary's own relative image links resolve), and
  everything under `benchmarks/results/` at `benchmarks/results/` (so the
  included `benchmarks/README.md` links as it does in the repository).
- Optional pages (`OPTIONAL_PAGES`, written by others): their nav entry is
  dropped, with a log line, while the file does not exist.
- The version: `VERSION_PLACEHOLDER` in a page becomes the package's
  `__version__`, read from `src/keras_moe/version.py` (the file hatch builds
  the package's version from), so the home page cannot show another one.
"""

import ast
import glob
import logging
import os
import posixpath

import griffe
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File
from mkdocs.structure.files import InclusionLevel

log = logging.getLogger("mkdocs.hooks.generated")

PACKAGE = "keras_moe"
# The public submodules, in reference order; a missing one is skipped.
MODULES = [
    "layers",
    "blocks",
    "routing",
    "callbacks",
    "compat",
    "distribution",
    "kerashub",
]
# The nav entry that becomes the API reference section.
REFERENCE_INDEX = "reference/index.md"
# Pages other people write; listed in the nav only once they exist.
OPTIONAL_PAGES = {"multi-host.md"}
# Written in a page where the package's version is shown.
VERSION_PLACEHOLDER = "{{ keras_moe.__version__ }}"
# Files mirrored into the site: (repository glob, folder it is relative to, docs folder).
MIRRORS = [
    ("results/*/*.png", "results", "experiments"),
    ("benchmarks/results/**/*", "benchmarks/results", "benchmarks/results"),
]


def public_names(module):
    """`module.__all__`, else the public names that `module` itself defines."""
    if module.exports is not None:
        names = [str(name) for name in module.exports]
        missing = [name for name in names if name not in module.members]
        if missing:
            raise PluginError(
                f"`{module.path}.__all__` names what the module does not define: "
                f"{missing}"
            )
        return names
    return [
        name
        for name, member in module.members.items()
        if member.is_public and not member.is_module
    ]


def reference_modules(root):
    """The package and its documented submodules, loaded by griffe."""
    package = griffe.load(
        PACKAGE, search_paths=[os.path.join(root, "src")], resolve_aliases=True
    )
    names = [name for name in MODULES if name in package.modules]
    for name in public_names(package):
        member = package[name]
        if member.is_module and member.name not in names:
            names.append(member.name)
    return package, [package[name] for name in names]


def page_of(module_name):
    return f"reference/{module_name.removeprefix(PACKAGE + '.')}.md"


def summary_line(member):
    """A docstring's first paragraph, on one line; else a short value."""
    target = member.final_target if member.is_alias else member
    if target.docstring is not None:
        text = target.docstring.value.strip().split("\n\n")[0]
    elif target.is_attribute and target.value is not None:
        text = f"`{target.value}`" if len(str(target.value)) <= 40 else ""
    else:
        text = ""
    return " ".join(text.split()).replace("|", "\\|")


def entry(path):
    return f"::: {path}\n    options:\n      heading_level: 2\n"


def module_page(module):
    lines = [
        f"# `{module.path}`\n",
        f"::: {module.path}\n"
        "    options:\n"
        "      members: false\n"
        "      show_root_heading: false\n"
        "      show_root_toc_entry: false\n",
    ]
    for name in public_names(module):
        lines.append(entry(f"{module.path}.{name}"))
    return "\n".join(lines)


def package_page(package, modules):
    """The package's page: what it exports, each linked to where it is documented."""
    homes = {}
    for module in modules:
        for name in public_names(module):
            member = module[name]
            target = member.final_target if member.is_alias else member
            if target.is_class or target.is_function:
                homes.setdefault(target.path, f"{module.path}.{name}")
    rows, entries = [], []
    for name in public_names(package):
        member = package[name]
        target = member.final_target if member.is_alias else member
        if target.is_module:
            link = f"[`{name}`]({posixpath.basename(page_of(target.path))})"
        elif target.path in homes:
            link = f"[`{name}`][{homes[target.path]}]"
        else:
            link = f"[`{name}`][{PACKAGE}.{name}]"
            entries.append(entry(f"{PACKAGE}.{name}"))
        rows.append(f"| {link} | {summary_line(member)} |")
    lines = [
        f"# `{PACKAGE}`\n",
        f"::: {PACKAGE}\n"
        "    options:\n"
        "      members: false\n"
        "      show_root_heading: false\n"
        "      show_root_toc_entry: false\n",
        f"`import {PACKAGE}` exports these names (`{PACKAGE}.__all__`):\n",
        "| name | summary |\n| --- | --- |",
        *rows,
        "",
        "Submodules:\n",
        *(
            f"- [`{m.path}`]({posixpath.basename(page_of(m.path))})"
            + (f": {summary_line(m)}" if summary_line(m) else "")
            for m in modules
        ),
        "",
        *entries,
    ]
    return "\n".join(lines)


def reference_pages(root):
    """{docs path: (nav title, markdown)} of the API reference."""
    package, modules = reference_modules(root)
    pages = {REFERENCE_INDEX: (PACKAGE, package_page(package, modules))}
    for module in modules:
        pages[page_of(module.path)] = (module.path, module_page(module))
    return pages


def mirrored_files(root):
    """(absolute source path, docs path) of every mirrored file."""
    for pattern, source, target in MIRRORS:
        for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
            if os.path.isfile(path):
                relative = os.path.relpath(path, os.path.join(root, source))
                yield path, posixpath.join(target, relative.replace(os.sep, "/"))


def package_version(root):
    """`keras_moe.__version__`, read from its file without importing the package."""
    path = os.path.join(root, "src", PACKAGE, "version.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise PluginError(f"{path} assigns no string to `__version__`")


def substitute_version(markdown, version):
    return markdown.replace(VERSION_PLACEHOLDER, version)


# Set by on_config, used by on_files and on_page_markdown of the same build.
_pages = {}
_version = {}


def _expand_nav(items, docs_dir):
    """The nav with the reference section filled in and absent optional pages dropped."""
    result = []
    for item in items:
        if isinstance(item, dict):
            ((title, value),) = item.items()
        else:
            title, value = None, item
        if isinstance(value, list):
            value = _expand_nav(value, docs_dir)
        elif value == REFERENCE_INDEX:
            value = [{t: path} for path, (t, _) in _pages.items()]
        elif value in OPTIONAL_PAGES and not os.path.exists(
            os.path.join(docs_dir, value)
        ):
            log.info("nav: '%s' is not written yet, left out of the nav", value)
            continue
        result.append(value if title is None else {title: value})
    return result


def on_config(config):
    root = os.path.dirname(config.config_file_path)
    _pages.clear()
    _pages.update(reference_pages(root))
    _version["value"] = package_version(root)
    config.nav = _expand_nav(config.nav or [], config.docs_dir)
    # `mkdocs serve` rebuilds when the package or the included results change.
    paths = ["src", "benchmarks/README.md", "benchmarks/results"]
    paths += glob.glob("results/*/summary.md", root_dir=root)
    for path in paths:
        path = os.path.join(root, path)
        if os.path.exists(path) and path not in config.watch:
            config.watch.append(path)
    return config


def on_files(files, config):
    for path, (_, markdown) in _pages.items():
        files.append(File.generated(config, path, content=markdown))
    root = os.path.dirname(config.config_file_path)
    for source, path in mirrored_files(root):
        # Served, and listed in the nav only where mkdocs.yml lists them: a new results
        # file is reachable by its links without an edit of the nav.
        inclusion = InclusionLevel.NOT_IN_NAV
        files.append(
            File.generated(config, path, abs_src_path=source, inclusion=inclusion)
        )
    return files


def on_page_markdown(markdown, page, config, files):
    return substitute_version(markdown, _version["value"])
