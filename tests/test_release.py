"""Release hygiene: one version everywhere, a changelog, dated prose, deprecations.

- One version: `keras_moe.__version__`, the version hatch builds the package
  with (the file `pyproject.toml`'s `[tool.hatch.version]` names, read with
  hatch's own pattern), the latest released entry of CHANGELOG.md and the
  version the docs' home page shows (docs/hooks/generated.py writes it in)
  are the same.
- CHANGELOG.md keeps the Keep a Changelog form: `## [Unreleased]` on top,
  then `## [X.Y.Z] - YYYY-MM-DD` entries, newest first, each made of its
  `### Added` / `Changed` / `Deprecated` / `Removed` / `Fixed` / `Security`
  lists.
- The project's prose dates measured numbers by dates and commits, never by
  internal milestones: the words "session" and "work period" appear in
  README.md, CHANGELOG.md, the Markdown the docs site shows or includes and
  the comments and strings of `src/` only inside code (`clear_session`,
  `tf.Session`).
- `keras_moe.utils.warn_deprecated` and `deprecated_argument`, which a public
  name or argument that goes away calls for one minor version.
"""

import datetime
import inspect
import io
import re
import tokenize
import warnings

import keras
import pytest

import keras_moe
from keras_moe import utils
from keras_moe.version import __version__
from tests.conftest import REPO
from tests.conftest import load_docs_hook

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there.
    import tomli as tomllib

# hatchling's `regex` version source: its default pattern, searched line by line.
HATCH_VERSION_PATTERN = r"(?i)^(__version__|VERSION) *= *([\'\"])v?(?P<version>.+?)\2"
RELEASE = re.compile(r"^(?P<major>\d+)\.(?P<minor>\d+)\.(?P<patch>\d+)$")
HEADING = re.compile(r"^## (?P<title>.*)$", re.MULTILINE)
RELEASE_HEADING = re.compile(r"^\[(?P<version>[^\]]+)\] - (?P<date>\d{4}-\d{2}-\d{2})$")
SECTIONS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def release_key(version):
    match = RELEASE.match(version)
    assert match, f"`{version}` is not a MAJOR.MINOR.PATCH version"
    return tuple(int(part) for part in match.groups())


def changelog_entries():
    """`[(heading, body)]` of CHANGELOG.md's `## ` entries, in file order."""
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = list(HEADING.finditer(text))
    ends = [h.start() for h in headings[1:]] + [len(text)]
    return [(h["title"].strip(), text[h.end() : end]) for h, end in zip(headings, ends)]


def released_entries():
    """`[(version, date, body)]` of the released entries, in file order."""
    entries = []
    for title, body in changelog_entries()[1:]:
        match = RELEASE_HEADING.match(title)
        assert match, (
            f"CHANGELOG.md: `## {title}` is not of the form `## [X.Y.Z] - YYYY-MM-DD`"
        )
        entries.append((match["version"], match["date"], body))
    return entries


# ---------------------------------------------------------------- the version


def test_package_version_is_a_release_version():
    assert keras_moe.__version__ == __version__
    release_key(__version__)


def test_hatch_builds_the_package_version():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    assert "version" not in project, "pyproject.toml must not state the version"
    assert "version" in project.get("dynamic", [])
    path = pyproject["tool"]["hatch"]["version"]["path"]
    assert path == "src/keras_moe/version.py"
    text = (REPO / path).read_text(encoding="utf-8")
    match = re.search(HATCH_VERSION_PATTERN, text, flags=re.MULTILINE)
    assert match, f"hatch finds no version in {path}"
    assert match["version"] == keras_moe.__version__


def test_changelog_latest_release_is_the_package_version():
    entries = released_entries()
    assert entries, "CHANGELOG.md has no released entry"
    version, date, _ = entries[0]
    assert version == keras_moe.__version__, (
        f"CHANGELOG.md's latest release is {version}, the package says "
        f"{keras_moe.__version__}"
    )
    datetime.date.fromisoformat(date)


def test_docs_home_page_shows_the_package_version():
    hook = load_docs_hook("generated")
    assert hook.package_version(REPO) == keras_moe.__version__
    page = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    assert hook.VERSION_PLACEHOLDER in page, "docs/index.md does not show the version"
    shown = hook.substitute_version(page, hook.package_version(REPO))
    assert hook.VERSION_PLACEHOLDER not in shown
    assert f"keras-moe {keras_moe.__version__}" in shown


# --------------------------------------------------------------- the changelog


def test_changelog_has_the_keep_a_changelog_form():
    entries = changelog_entries()
    assert entries and entries[0][0] == "[Unreleased]", (
        "CHANGELOG.md must start with a `## [Unreleased]` section"
    )
    releases = released_entries()
    versions = [release_key(version) for version, _, _ in releases]
    assert versions == sorted(set(versions), reverse=True), (
        "CHANGELOG.md's releases must be unique and newest first"
    )
    dates = [datetime.date.fromisoformat(date) for _, date, _ in releases]
    assert dates == sorted(dates, reverse=True)
    for title, body in entries:
        sections = re.findall(r"^### (.*)$", body, flags=re.MULTILINE)
        unknown = set(sections) - SECTIONS
        assert not unknown, f"CHANGELOG.md `## {title}`: unknown sections {unknown}"
        assert len(sections) == len(set(sections)), f"`## {title}`: repeated sections"
    for version, _, body in releases:
        assert re.search(r"^### ", body, flags=re.MULTILINE), f"{version}: no section"
        assert re.search(r"^- ", body, flags=re.MULTILINE), f"{version}: no entry"


# ------------------------------------------------------- prose without milestones

# Words that date by internal milestones, in prose. A word joined to code (a
# preceding `.` or `_`, a following `_`, `(` or `.name`) is an identifier.
MILESTONE = re.compile(
    r"(?<![\w.])(sessions?|work[\s-]+periods?)(?![\w(]|\.\w)", re.IGNORECASE
)
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# Everything the README, the changelog and the docs site show or include.
PROSE_GLOBS = [
    "README.md",
    "CHANGELOG.md",
    "docs/**/*.md",
    "benchmarks/**/*.md",
    "results/**/*.md",
]


def blank(match):
    """The match's text with everything but its line breaks removed."""
    return "\n" * match.group(0).count("\n")


def markdown_prose(text):
    """`text` without fenced code blocks and code spans, line numbers kept."""
    lines, fenced = [], None
    for line in text.split("\n"):
        fence = FENCE.match(line)
        if fenced is None and fence:
            fenced = fence[1]
            lines.append("")
        elif fenced is not None:
            if fence and fence[1] == fenced:
                fenced = None
            lines.append("")
        else:
            lines.append(line)
    return CODE_SPAN.sub(blank, "\n".join(lines))


def python_prose(text):
    """`[(first line, text)]` of the comments and strings of Python source."""
    kinds = {tokenize.COMMENT, tokenize.STRING}
    if hasattr(tokenize, "FSTRING_MIDDLE"):  # Python 3.12+ splits f-strings.
        kinds.add(tokenize.FSTRING_MIDDLE)
    return [
        (token.start[0], CODE_SPAN.sub(blank, token.string))
        for token in tokenize.generate_tokens(io.StringIO(text).readline)
        if token.type in kinds
    ]


def milestones(chunks):
    """`[(line, words)]` of the milestone words in `[(first line, text)]`."""
    found = []
    for first_line, text in chunks:
        for match in MILESTONE.finditer(text):
            line = first_line + text.count("\n", 0, match.start())
            found.append((line, " ".join(match.group(0).split())))
    return found


def prose_files():
    paths = {path for pattern in PROSE_GLOBS for path in REPO.glob(pattern)}
    paths |= set((REPO / "src").rglob("*.py"))
    return sorted(paths)


def milestone_words(path):
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return milestones(python_prose(text))
    return milestones([(1, markdown_prose(text))])


@pytest.mark.parametrize(
    "text, found",
    [
        ("Measured in the fifth session.", [(1, "session")]),
        ("Sessions ran\nin a work\nperiod.", [(1, "Sessions"), (2, "work period")]),
        ("lost between work-periods", [(1, "work-periods")]),
        ("`keras.backend.clear_session()` and `tf.Session`", []),
        ("```python\nsession = tf.Session()\n```\nno word here", []),
        ("keras.backend.clear_session() and tf.Session()", []),
        ("session.run(x) or Session(config)", []),
    ],
)
def test_milestone_words_in_markdown(text, found):
    assert milestones([(1, markdown_prose(text))]) == found


def test_milestone_words_in_python():
    source = (
        "import keras\n"
        "keras.backend.clear_session()  # frees the graph: not per session\n"
        'NAME = "tf.Session"\n'
        'def f():\n    """Runs `clear_session` once per work period."""\n'
    )
    assert milestones(python_prose(source)) == [(2, "session"), (5, "work period")]


def test_prose_dates_by_dates_and_commits_not_milestones():
    files = prose_files()
    assert REPO / "README.md" in files and REPO / "docs" / "index.md" in files
    found = [
        f"{path.relative_to(REPO)}:{line}: {words}"
        for path in files
        for line, words in milestone_words(path)
    ]
    assert not found, (
        "date these by the date and the commit or command that measured them, "
        "not by an internal milestone:\n" + "\n".join(found)
    )


# ---------------------------------------------------------------- deprecations


def old_name():
    """A deprecated function, as a public name that goes away warns."""
    utils.warn_deprecated("old_name", "new_name", "9.0.0")


def test_warn_deprecated_names_the_replacement_and_the_removal():
    with pytest.warns(DeprecationWarning) as record:
        line = inspect.currentframe().f_lineno + 1
        old_name()
    assert len(record) == 1
    assert str(record[0].message) == (
        "`old_name` is deprecated and will be removed in keras-moe 9.0.0. "
        "Use `new_name` instead."
    )
    # Attributed to the code that called the deprecated thing.
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_warn_deprecated_keeps_a_phrase_with_its_own_code():
    """A phrase that sets its names in backticks is not set in more."""
    with pytest.warns(DeprecationWarning) as record:
        utils.warn_deprecated(
            "`Layer(old=...)`", "`New(new=...)` passed as `Layer(part=...)`", "9.0.0"
        )
    assert str(record[0].message) == (
        "`Layer(old=...)` is deprecated and will be removed in keras-moe 9.0.0. "
        "Use `New(new=...)` passed as `Layer(part=...)` instead."
    )


class RenamedArgument(keras.layers.Layer):
    """A layer whose `old_units` became `units`, as a renamed argument goes."""

    def __init__(self, units=None, **kwargs):
        old_units = utils.deprecated_argument(kwargs, "old_units", "units", "9.0.0")
        super().__init__(**kwargs)
        self.units = old_units if units is None else units

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_deprecated_argument_keeps_the_old_argument_working():
    with pytest.warns(DeprecationWarning) as record:
        line = inspect.currentframe().f_lineno + 1
        layer = RenamedArgument(old_units=3, name="renamed")
    assert layer.units == 3 and layer.name == "renamed"
    assert len(record) == 1
    assert str(record[0].message) == (
        "`old_units` is deprecated and will be removed in keras-moe 9.0.0. "
        "Use `units` instead."
    )
    # Attributed to the user's call of the layer, not to keras-moe's code.
    assert (record[0].filename, record[0].lineno) == (__file__, line)
    # The new argument and a config saved by an older version both load.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RenamedArgument(units=4).units == 4
        assert RenamedArgument.from_config(layer.get_config()).units == 3
    with pytest.warns(DeprecationWarning, match=r"`old_units` is deprecated"):
        assert RenamedArgument.from_config({"old_units": 5}).units == 5


def test_deprecated_argument_default():
    kwargs = {"name": "moe"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert utils.deprecated_argument(kwargs, "old", "new", "9.0.0") is None
        value = utils.deprecated_argument(kwargs, "old", "new", "9.0.0", default=7)
    assert value == 7 and kwargs == {"name": "moe"}


@pytest.mark.parametrize(
    "args, error, message",
    [
        (("", "new", "9.0.0"), ValueError, r"`old` must be a non-empty string"),
        (("old", None, "9.0.0"), TypeError, r"`new` must be a non-empty string"),
        (("old", "new", "0.3"), ValueError, r"`removed_in` must be a version"),
        (
            ("old", "new", __version__),
            ValueError,
            rf"`removed_in` must be a version after keras-moe {re.escape(__version__)}",
        ),
    ],
)
def test_warn_deprecated_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        utils.warn_deprecated(*args)
