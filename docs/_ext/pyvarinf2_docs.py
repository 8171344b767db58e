"""Sphinx extension for the pyvarinf2 docs: pages generated from files that may or may not exist.

Before Sphinx reads the sources (``builder-inited``) it writes, under ``<srcdir>/_generated/``:

* ``results.inc`` — one table per result file found under the directories in the config value
  ``pyvarinf2_results_dirs`` (default ``results`` and ``benchmarks/results``, relative to the
  repository root, i.e. the parent of the docs folder). CSV, JSON, Markdown and plain-text files
  are rendered; anything else is listed. A file that cannot be parsed is shown as such, never a
  build error, so the results page builds whatever the experiments have written so far.
* ``notebooks.inc`` plus PNG files — for every notebook in ``pyvarinf2_notebooks_dir`` (default
  ``notebooks``): its title, its first paragraph and the figures of the cells tagged ``gallery``
  (all figures, up to three, when no cell is tagged), taken from the *committed outputs*.

``docs/results.rst`` and ``docs/notebooks.rst`` pull these in with ``.. include::``; the folder is
listed in ``exclude_patterns`` so Sphinx does not read it as documents of its own.

The renderers are plain functions (``render_file``, ``generate_results``,
``generate_notebooks``) so that the tests can call them on crafted files.
"""
import base64
import csv
import io
import json
import os
import re

from sphinx.util import logging

logger = logging.getLogger(__name__)

MAX_ROWS = 300
RESULT_SUFFIXES = (".csv", ".tsv", ".json", ".md", ".txt")
_LIST_MARKER = re.compile(r"^([-+*\u2022]|#\.|\(?[0-9A-Za-z#]{1,3}[.)])(\s|$)")
_INLINE = re.compile(r"([\\`*_|<>\[\]])")


# ------------------------------------------------------------------------------- rst helpers
def rst_escape(value):
    """Make ``value`` safe as inline reStructuredText: markup characters are escaped and text
    that would start a list or a block construct is protected."""
    text = format_value(value)
    text = " ".join(text.split())  # one line: newlines would end the table cell
    text = _INLINE.sub(r"\\\1", text)
    if _LIST_MARKER.match(text) or text.startswith((".. ", "::", "=", "~", "^", ":")):
        text = "\\" + text
    return text


def format_value(value):
    """Short, readable text for one table cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}" if abs(value) < 1 else f"{value:.5g}"
        return f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        parts = [format_value(v) for v in value[:8]]
        more = ", ..." if len(value) > 8 else ""
        return "[" + ", ".join(parts) + more + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)[:200]
    return str(value)


def _numeric_text(cell):
    """Round long decimal strings from CSV files (``0.123456789`` -> ``0.1235``)."""
    s = cell.strip()
    if re.fullmatch(r"[-+]?\d+\.\d{5,}([eE][-+]?\d+)?", s):
        try:
            return format_value(float(s))
        except ValueError:
            pass
    return s


_MD_INLINE = re.compile(r"(`[^`]+`|\$[^$]+\$)")


def markdown_inline_to_rst(text):
    """One paragraph of notebook Markdown as reStructuredText: a backtick code span becomes an
    inline literal, ``$math$`` a ``:math:`` role, everything else is escaped text."""
    text = " ".join(text.split())
    out = []
    for i, part in enumerate(_MD_INLINE.split(text)):
        if i % 2 == 0:
            if part:
                out.append(_INLINE.sub(r"\\\1", part))
        elif part.startswith("`"):
            out.append("\\ :literal:`" + part[1:-1].replace("\\", "\\\\").replace("`", "\\`")
                       + "`\\ ")
        else:
            out.append("\\ :math:`" + part[1:-1].replace("`", "") + "`\\ ")
    result = "".join(out).strip()
    if result.startswith("\\ "):
        result = result[2:]
    if result.endswith("\\"):
        result = result[:-1].rstrip()
    if _LIST_MARKER.match(result):
        result = "\\" + result
    return result


def list_table(header, rows, caption=None):
    """A ``list-table`` directive (lines) for ``header`` and ``rows`` (lists of cells)."""
    width = max([len(header)] + [len(r) for r in rows]) if (header or rows) else 0
    if width == 0:
        return []
    header = list(header) + [""] * (width - len(header))
    title = f" {rst_escape(caption)}" if caption else ""
    lines = [f".. list-table::{title}", "   :header-rows: 1", ""]
    for row in [header] + [list(r) + [""] * (width - len(r)) for r in rows]:
        for j, cell in enumerate(row):
            text = rst_escape(cell)
            prefix = "   * - " if j == 0 else "     - "
            lines.append((prefix + text).rstrip())
    lines.append("")
    return lines


def literal_block(text, max_lines=80):
    body = text.rstrip("\n").splitlines()
    extra = len(body) - max_lines
    body = body[:max_lines]
    if extra > 0:
        body.append(f"... ({extra} more lines)")
    if not any(line.strip() for line in body):
        return ["(empty file)", ""]
    return [".. code-block:: text", ""] + ["    " + line.replace("\t", "    ") for line in body] + [""]


def heading(text, char, literal=False):
    text = f"``{text}``" if literal and "`" not in text else rst_escape(text)
    return [text, char * max(len(text), 4), ""]


# ------------------------------------------------------------------------------- renderers
def render_csv(path, delimiter=","):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh, delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        return ["(empty file)", ""]
    header, body = rows[0], rows[1:]
    note = []
    if len(body) > MAX_ROWS:
        note = [f"(first {MAX_ROWS} of {len(body)} rows)", ""]
        body = body[:MAX_ROWS]
    return list_table(header, [[_numeric_text(c) for c in r] for r in body]) + note


def _flatten(obj, prefix=""):
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]`` (lists of scalars stay values)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.extend(_flatten(v, key))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                if len(v) > 3:  # a history: its last entry is the result
                    out.extend(_flatten(v[-1], f"{key}[{len(v) - 1}] (last of {len(v)})"))
                else:
                    for i, x in enumerate(v):
                        out.extend(_flatten(x, f"{key}[{i}]"))
            else:
                out.append((key, v))
    else:
        out.append((prefix or "value", obj))
    return out


def _records_table(records, first_column=None):
    keys = []
    for rec in records.values() if isinstance(records, dict) else records:
        for k, _ in _flatten(rec):
            if k not in keys:
                keys.append(k)
    header = ([first_column] if first_column is not None else []) + keys
    rows = []
    items = records.items() if isinstance(records, dict) else enumerate(records)
    for name, rec in items:
        flat = dict(_flatten(rec))
        rows.append(([name] if first_column is not None else []) + [flat.get(k, "") for k in keys])
    note = []
    if len(rows) > MAX_ROWS:
        note = [f"(first {MAX_ROWS} of {len(rows)} rows)", ""]
        rows = rows[:MAX_ROWS]
    return list_table(header, rows) + note


def _is_record_collection(value):
    """``{"mlp": {...}, "cnn": {...}}``: several records with mostly the same (few) keys."""
    if not (isinstance(value, dict) and len(value) > 1
            and all(isinstance(v, dict) and v for v in value.values())):
        return False
    key_sets = [set(k for k, _ in _flatten(v)) for v in value.values()]
    shared, union = set.intersection(*key_sets), set.union(*key_sets)
    return len(union) <= 16 and len(shared) >= max(1, len(union) // 2)


def render_json(path):
    """A list of records or a dict of records is one table; any other object is a key/value
    table of its flattened scalars, followed by one table per nested dict of records."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        return _records_table(data)
    if not (isinstance(data, dict) and data):
        return literal_block(json.dumps(data, indent=1, default=str))
    if _is_record_collection(data):
        return _records_table(data, first_column="")
    flat, collections = {}, []
    for key, value in data.items():
        if _is_record_collection(value):
            collections.append((key, value))
        else:
            flat[key] = value
    out = []
    rows = [[k, v] for k, v in _flatten(flat)]
    if rows:
        note = []
        if len(rows) > MAX_ROWS:
            note = [f"(first {MAX_ROWS} of {len(rows)} entries)", ""]
            rows = rows[:MAX_ROWS]
        out += list_table(["key", "value"], rows) + note
    for key, value in collections:
        out += [f".. rubric:: {rst_escape(key)}", ""]
        out += _records_table(value, first_column="")
    return out


def _split_pipe_row(line):
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [c.strip().replace("\\|", "|").replace("`", "") for c in cells]


_MD_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def render_markdown(path):
    """Markdown: pipe tables become tables, headings rubrics, code fences literal blocks and
    the rest plain paragraphs (inline markup is shown as text)."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    out, paragraph = [], []

    def flush():
        if paragraph:
            out.extend([markdown_inline_to_rst(" ".join(paragraph)), ""])
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.extend(literal_block("\n".join(lines[i + 1:j])))
            i = j + 1
            continue
        if "|" in stripped and i + 1 < len(lines) and _MD_SEPARATOR.match(lines[i + 1]):
            flush()
            header = _split_pipe_row(stripped)
            rows = []
            j = i + 2
            while j < len(lines) and "|" in lines[j] and lines[j].strip():
                rows.append(_split_pipe_row(lines[j]))
                j += 1
            out.extend(list_table(header, rows[:MAX_ROWS]))
            i = j
            continue
        m = re.match(r"^#{1,6}\s+(.*)$", stripped)
        if m:
            flush()
            out.extend([f".. rubric:: {rst_escape(m.group(1).strip('# '))}", ""])
        elif not stripped:
            flush()
        else:
            paragraph.append(re.sub(r"^([-*+]|\d+\.)\s+", "", stripped) if not paragraph
                             else stripped)
        i += 1
    flush()
    return out or ["(empty file)", ""]


def render_text(path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        return literal_block(fh.read())


def render_file(path):
    """reStructuredText lines showing one result file (never raises on bad content)."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".csv":
            return render_csv(path)
        if suffix == ".tsv":
            return render_csv(path, delimiter="\t")
        if suffix == ".json":
            return render_json(path)
        if suffix == ".md":
            return render_markdown(path)
        return render_text(path)
    except Exception as exc:  # a broken file must not break the docs
        logger.info("pyvarinf2_docs: could not render %s: %s", path, exc)
        return [f"This file could not be read as {suffix[1:].upper()}: "
                f"{rst_escape(type(exc).__name__ + ': ' + str(exc))}", ""]


# ------------------------------------------------------------------------------- generators
def _result_files(folder):
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for name in sorted(filenames):
            if name.lower().endswith(RESULT_SUFFIXES) and not name.startswith("."):
                found.append(os.path.join(dirpath, name))
    return found


def generate_results(root, dirs):
    """The text of ``results.inc`` for the result directories ``dirs`` (relative to ``root``
    or absolute)."""
    out = []
    any_file = False
    for d in dirs:
        folder = d if os.path.isabs(d) else os.path.join(root, d)
        label = os.path.relpath(folder, root) if not os.path.isabs(d) else d
        files = _result_files(folder) if os.path.isdir(folder) else []
        out.extend(heading(f"{label}/", "-", literal=True))
        if not files:
            out.extend([f"No result files in ``{label}/`` yet.", ""])
            continue
        any_file = True
        for path in files:
            rel = os.path.relpath(path, root) if not os.path.isabs(d) else path
            out.extend(heading(rel, "~", literal=True))
            out.extend(render_file(path))
    if not any_file:
        out.extend(["The result tables appear here once the experiments and benchmarks have "
                    "written their files.", ""])
    return "\n".join(out) + "\n"


def _notebook_text(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def generate_notebooks(root, nb_dir, image_dir, image_prefix, max_images=3):
    """The text of ``notebooks.inc``; writes the gallery PNGs into ``image_dir`` (referenced in
    the text as ``image_prefix + name``)."""
    folder = nb_dir if os.path.isabs(nb_dir) else os.path.join(root, nb_dir)
    notebooks = sorted(f for f in os.listdir(folder) if f.endswith(".ipynb")) \
        if os.path.isdir(folder) else []
    if not notebooks:
        return "No notebooks found.\n"
    os.makedirs(image_dir, exist_ok=True)
    out = []
    for name in notebooks:
        path = os.path.join(folder, name)
        stem = name[:-len(".ipynb")]
        try:
            with open(path, encoding="utf-8") as fh:
                nb = json.load(fh)
        except Exception as exc:
            out.extend(heading(name, "-"))
            out.extend([f"Could not read the notebook: {rst_escape(str(exc))}", ""])
            continue
        cells = nb.get("cells", [])
        title, summary = stem, ""
        for cell in cells:
            if cell.get("cell_type") != "markdown":
                continue
            text = _notebook_text(cell).strip()
            m = re.match(r"^#\s+(.+)$", text, re.M)
            if m:
                title = m.group(1).strip()
                rest = text[m.end():].strip().split("\n\n")
                summary = rest[0] if rest and rest[0] else ""
                break
        out.extend(heading(title, "-"))
        rel = os.path.relpath(path, root) if not os.path.isabs(nb_dir) else path
        out.extend([f"File: ``{rel}``", ""])
        if summary:
            out.extend([markdown_inline_to_rst(summary), ""])
        tagged = [c for c in cells if "gallery" in c.get("metadata", {}).get("tags", [])]
        chosen = tagged if tagged else [c for c in cells if c.get("cell_type") == "code"]
        images = []
        for cell in chosen:
            for output in cell.get("outputs", []) or []:
                png = (output.get("data") or {}).get("image/png")
                if png:
                    images.append("".join(png) if isinstance(png, list) else png)
        if not tagged:
            images = images[:max_images]
        if not images:
            out.extend(["(This notebook has no stored figure outputs.)", ""])
        for i, b64 in enumerate(images):
            fname = f"{stem}_{i}.png"
            data = base64.b64decode(b64)
            target = os.path.join(image_dir, fname)
            if not (os.path.exists(target) and open(target, "rb").read() == data):
                with open(target, "wb") as fh:
                    fh.write(data)
            out.extend([f".. image:: {image_prefix}{fname}", "   :width: 100%",
                        f"   :alt: figure {i + 1} of {rst_escape(stem)}", ""])
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- docstrings
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def titles_to_rubrics(lines):
    """Turn section titles inside a docstring (a line underlined with ``===``, ``---``, ...)
    into ``.. rubric::`` directives, in place: docutils does not allow sections inside the body
    of an autodoc directive, and module docstrings of this project use them as headings."""
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i], lines[i + 1]
        prev_blank = i == 0 or not lines[i - 1].strip()
        if (prev_blank and title.strip() and not title.startswith((" ", "\t"))
                and _UNDERLINE.match(under) and len(under.strip()) >= len(title.strip())
                and not _UNDERLINE.match(title)):
            lines[i:i + 2] = [f".. rubric:: {title.strip()}"]
            if i + 1 < len(lines) and lines[i + 1].strip():
                lines.insert(i + 1, "")
        i += 1
    return lines


_STAR_PARAM = re.compile(r"^(\s*:(?:param|type)\s+)(\*{1,2})(\w+\s*:)")


def escape_star_params(lines):
    """``:param **kwargs:`` -> ``:param \\*\\*kwargs:`` (napoleon escapes only the first of
    ``*args, **kwargs`` written on one line; an unescaped ``**`` starts bold text)."""
    for i, line in enumerate(lines):
        m = _STAR_PARAM.match(line)
        if m:
            lines[i] = m.group(1) + "\\*" * len(m.group(2)) + m.group(3) + line[m.end():]
    return lines


def _on_process_docstring(app, what, name, obj, options, lines):
    titles_to_rubrics(lines)
    escape_star_params(lines)


def _write_if_changed(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                return
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _on_builder_inited(app):
    srcdir = str(app.srcdir)
    root = os.path.dirname(os.path.abspath(srcdir))
    gen = os.path.join(srcdir, "_generated")
    _write_if_changed(os.path.join(gen, "results.inc"),
                      generate_results(root, app.config.pyvarinf2_results_dirs))
    _write_if_changed(os.path.join(gen, "notebooks.inc"),
                      generate_notebooks(root, app.config.pyvarinf2_notebooks_dir,
                                         os.path.join(gen, "notebooks"),
                                         "/_generated/notebooks/"))


def setup(app):
    app.add_config_value("pyvarinf2_results_dirs", ["results", "benchmarks/results"], "env")
    app.add_config_value("pyvarinf2_notebooks_dir", "notebooks", "env")
    app.connect("builder-inited", _on_builder_inited)
    app.setup_extension("sphinx.ext.autodoc")
    # after napoleon (priority 500), which turns its own section names into fields first
    app.connect("autodoc-process-docstring", _on_process_docstring, priority=600)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
