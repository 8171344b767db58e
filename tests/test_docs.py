"""The documentation: it builds with warnings as errors, its numbers are what the library
computes, the generated pages survive whatever result files exist, and every public module is
in the API reference."""
import base64
import doctest
import importlib
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import pyvarinf2_docs  # noqa: E402  (docs/_ext/pyvarinf2_docs.py)


def _sphinx(srcdir, outdir, *extra):
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
           *extra, str(srcdir), str(outdir)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=300)


def test_docs_build_without_warnings(tmp_path):
    """Exactly CI's command: ``sphinx-build -W --keep-going -b html docs <out>``."""
    proc = _sphinx(DOCS, tmp_path / "html", "-d", str(tmp_path / "doctrees"))
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    html = tmp_path / "html"
    for page in ("index", "kl_scaling", "architecture", "api", "results", "notebooks",
                 "maths/learning_rule", "maths/kfac", "maths/ivon", "maths/priors"):
        assert (html / f"{page}.html").is_file(), f"{page}.html was not built"
    api = (html / "api.html").read_text(encoding="utf-8")
    # autodoc really imported the code: signatures and docstrings are in the page
    assert "prior_loss" in api and "KL(q || prior) summed over all parameters" in api


def test_kl_scaling_numbers_are_what_the_library_computes():
    """Every ``>>>`` example on the KL-scaling page runs and prints what the page says."""
    result = doctest.testfile(str(DOCS / "kl_scaling.rst"), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted >= 20
    assert result.failed == 0


def _public_modules():
    pkg = ROOT / "pyvarinf2"
    names = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts
        if any(p.startswith("_") for p in parts[1:]):
            continue  # private modules and __init__/__main__
        names.append(".".join(parts))
    return names


def test_every_public_module_is_in_the_api_reference():
    api = (DOCS / "api.rst").read_text(encoding="utf-8")
    missing = []
    for name in _public_modules():
        if name.startswith("pyvarinf2.optim."):
            # optimizer modules are documented through their classes in pyvarinf2.optim
            module = importlib.import_module(name)
            classes = [c for c in getattr(module, "__all__", [])
                       if isinstance(getattr(module, c, None), type)]
            missing += [f"{name}.{c}" for c in classes
                        if f"autoclass:: pyvarinf2.optim.{c}" not in api]
        elif f"automodule:: {name}\n" not in api:
            missing.append(name)
    assert not missing, f"not in docs/api.rst: {missing}"


def test_architecture_page_is_in_the_toctree():
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    assert "\n   architecture\n" in index
    assert "\n   kl_scaling\n" in index


# ---------------------------------------------------------------- the generated pages
def test_titles_inside_docstrings_become_rubrics():
    lines = ["Intro.", "", "Where the files are", "-------------------", "Text.",
             "", "Table", "=====", "", "    indented", "    --------"]
    out = pyvarinf2_docs.titles_to_rubrics(list(lines))
    assert ".. rubric:: Where the files are" in out
    assert ".. rubric:: Table" in out
    assert "-------------------" not in out and "=====" not in out
    assert out[-2:] == ["    indented", "    --------"]  # indented blocks are left alone


def test_star_parameters_are_escaped():
    out = pyvarinf2_docs.escape_star_params([":param \\*args: inputs.",
                                             ":param **kwargs: inputs."])
    assert out == [":param \\*args: inputs.", ":param \\*\\*kwargs: inputs."]


def test_rst_escape_protects_markup_and_list_markers():
    esc = pyvarinf2_docs.rst_escape
    assert esc("*bold") == "\\*bold"
    assert esc("a_b_") == "a\\_b\\_"
    assert esc("1.") == "\\1."
    assert esc("- x") == "\\- x"
    assert esc("0.092") == "0.092"
    assert esc(-2.4) == "-2.4"
    assert esc(0.123456) == "0.1235"


_PNG_1x1 = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()


def _tricky_results(folder):
    (folder / "sub").mkdir(parents=True)
    (folder / "uci.csv").write_text(
        "dataset,method,rmse,note\n"
        "yacht,noisy_kfac,0.98123456789,*starred\n"
        "boston_housing,bbb,2.74,1.\n"
        "concrete,map,,- dash |pipe| `tick` a_b_\n", encoding="utf-8")
    (folder / "records.json").write_text(json.dumps(
        [{"method": "vogn", "acc": 0.981, "nested": {"ece": 0.012}},
         {"method": "ivon", "acc": 0.979}]), encoding="utf-8")
    (folder / "bench.json").write_text(json.dumps(
        {"mlp": {"plain_ms": 3.1, "bbb_ms": 7.0}, "cnn": {"plain_ms": 10.0, "bbb_ms": 21.0},
         "machine": {"cpu": "2 cores"}}), encoding="utf-8")
    (folder / "sub" / "scalars.json").write_text(json.dumps(
        {"ratio": 2.25, "steps": 60, "list": [1, 2, 3], "deep": {"a": {"b": 1e-9}},
         "timing": {"mlp_small": {"ms": 1.0, "ratio": 2.0}, "cnn_big": {"ms": 9.0, "ratio": 1.5}},
         "history": [{"epoch": i, "acc": 0.9 + i / 100} for i in range(5)]}),
        encoding="utf-8")
    (folder / "broken.json").write_text("{not json", encoding="utf-8")
    (folder / "table.md").write_text(textwrap.dedent("""\
        # UCI summary

        Some *markdown* text_with_underscores.

        | dataset | RMSE |
        |---|---:|
        | yacht | 0.98 |
        | wine | 0.64 |

        ```
        raw output
        ```
        """), encoding="utf-8")
    (folder / "log.txt").write_text("line 1\n\tline 2\n", encoding="utf-8")
    (folder / "empty.csv").write_text("", encoding="utf-8")


def test_generated_results_and_gallery_build_cleanly(tmp_path):
    """Awkward result files and a notebook with a figure go through a real Sphinx build with
    warnings as errors, and the page shows their contents."""
    results = tmp_path / "results"
    _tricky_results(results)
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# A *title*\n", "\n",
                                                             "What it_shows: `f(x) / N` and $y = x^3$.\n"]},
        {"cell_type": "code", "metadata": {"tags": ["gallery"]}, "execution_count": 1,
         "source": ["plot()"], "outputs": [{"output_type": "display_data", "metadata": {},
                                            "data": {"image/png": _PNG_1x1}}]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (nbs / "01_demo.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(DOCS / '_ext')!r})
        extensions = ["pyvarinf2_docs"]
        exclude_patterns = ["_generated"]
        pyvarinf2_results_dirs = [{str(results)!r}, "does/not/exist"]
        pyvarinf2_notebooks_dir = {str(nbs)!r}
        """), encoding="utf-8")
    (src / "index.rst").write_text("Results\n=======\n\n.. include:: _generated/results.inc\n\n"
                                   ".. toctree::\n\n   gallery\n", encoding="utf-8")
    (src / "gallery.rst").write_text("Gallery\n=======\n\n.. include:: _generated/notebooks.inc\n",
                                     encoding="utf-8")
    proc = _sphinx(src, tmp_path / "html")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    page = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    for text in ("noisy_kfac", "0.9812", "*starred", "|pipe|", "a_b_", "records.json",
                 "0.981", "nested.ece", "plain_ms", "2.25", "could not be read", "yacht",
                 "rubric\">timing<", "<p>mlp_small</p>", "history[4] (last of 5)",
                 "raw output", "line 2", "No result files in", "UCI summary"):
        assert text in page, f"{text!r} missing from the generated results page"
    gallery = (tmp_path / "html" / "gallery.html").read_text(encoding="utf-8")
    assert "A *title*" in gallery and "What it_shows:" in gallery
    assert '<span class="pre">f(x)</span>' in gallery  # an inline literal, not escaped text
    assert "y = x^3" in gallery
    assert (tmp_path / "html" / "_images" / "01_demo_0.png").is_file()


def test_no_result_files_gives_a_page_not_an_error(tmp_path):
    text = pyvarinf2_docs.generate_results(str(tmp_path), ["results", "benchmarks/results"])
    assert "No result files in ``results/`` yet." in text
    assert "once the experiments and benchmarks have written" in text


@pytest.mark.parametrize("suffix", [".csv", ".json", ".md", ".txt"])
def test_render_never_raises(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\xff\xfe\x00garbage,\"unterminated\n{[")
    lines = pyvarinf2_docs.render_file(str(path))
    assert isinstance(lines, list) and lines
