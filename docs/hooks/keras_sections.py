"""Griffe extension: Keras's docstring sections, read as Google-style ones.

keras-moe writes docstrings in Keras's order (`Args:`, `Call arguments:`,
`Input shape:`, `Output shape:`, `Example:`, `References:`). Griffe's Google
parser knows `Args:`, `Returns:`, `Raises:` and `Examples:`; the others it
would render as boxed admonitions, and Keras's `Example:` (doctest lines at
the docstring's own indentation, after a blank line) as plain text, where
Markdown reads `>>>` as nested quotes. Before parsing, this rewrites them:

- `Call arguments:` -> a parameter list titled "Call arguments:" (parsed as
  `Other Parameters:`, so no check against the signature);
- `Example:` / `Examples:` -> an examples section (doctests highlighted),
  its block indented as the parser expects;
- `Input shape:`, `Output shape:`, `Weights:`, `References:` -> a section
  title like the others, followed by the block as Markdown.

Only the layout changes; the words are the docstring's.
"""

import re

import griffe

# Parsed as a list of `name: description` items, with this title.
PARAMETER_SECTIONS = {"call arguments": "Call arguments:"}
# Doctests (`>>>`) and Markdown, with this title.
EXAMPLE_SECTIONS = {"example": "Example:", "examples": "Examples:"}
# A title, then the block as Markdown.
TEXT_SECTIONS = {"input shape", "output shape", "weights", "references"}
# Every title that ends a Keras `Example:` block written without indentation.
SECTION_TITLES = {
    "args",
    "arguments",
    "attributes",
    "raises",
    "returns",
    "yields",
    "warns",
    *PARAMETER_SECTIONS,
    *EXAMPLE_SECTIONS,
    *TEXT_SECTIONS,
}
_TITLE = re.compile(r"^(?P<title>[A-Za-z][A-Za-z ]*):(?:\s+(?P<rest>\S.*))?$")


def _title(line):
    """The lowercased section title `line` starts, else None."""
    match = _TITLE.match(line)
    if match and match["title"].lower() in SECTION_TITLES:
        return match["title"].lower(), match["rest"]
    return None, None


def _block(lines, start, indented_only):
    """End (exclusive) of the block from `start`; blank lines at its end excluded."""
    end = start
    while end < len(lines):
        line = lines[end]
        if line.strip() and not line.startswith(" "):
            if indented_only or _title(line)[0] is not None:
                break
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return end


def _dedent(lines):
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents, default=0)
    return [line[cut:] for line in lines]


def rewrite(text):
    """`text` (a cleaned docstring) with its Keras sections made Google-style."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        title, rest = _title(line)
        rewritten = title in PARAMETER_SECTIONS or title in TEXT_SECTIONS
        # Keras's title stands alone; "Examples: Example:" is this function's own.
        rewritten = rewritten or (title in EXAMPLE_SECTIONS and rest is None)
        if not rewritten or (i > 0 and lines[i - 1].strip()):
            out.append(line)
            i += 1
            continue
        # Keras writes an example's lines at the docstring's own indentation.
        start = i + 1
        if title in EXAMPLE_SECTIONS:
            while start < len(lines) and not lines[start].strip():
                start += 1
        end = _block(lines, start, indented_only=title not in EXAMPLE_SECTIONS)
        body = _dedent(lines[start:end])
        if rest:
            body = [rest, *body]
        if not any(body):
            out.append(line)
            i += 1
            continue
        if title in PARAMETER_SECTIONS:
            out.append(f"Other Parameters: {PARAMETER_SECTIONS[title]}")
            out.extend("    " + b if b.strip() else "" for b in body)
        elif title in EXAMPLE_SECTIONS:
            out.append(f"Examples: {EXAMPLE_SECTIONS[title]}")
            out.extend("    " + b if b.strip() else "" for b in body)
        else:
            name = line.split(":", 1)[0]
            out.append(f'<p><span class="doc-section-title">{name}:</span></p>')
            out.append("")
            out.extend(body)
        i = end
    return "\n".join(out)


class KerasSections(griffe.Extension):
    """Rewrites Keras's docstring sections before griffe parses them."""

    def on_instance(self, *, obj, **kwargs):
        # `rewrite` is idempotent, so an object seen twice is no harm.
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
