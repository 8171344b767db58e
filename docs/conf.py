"""Sphinx configuration for pyvarinf2.

Builds offline with only Sphinx installed (the alabaster theme ships with it). The local
extension ``_ext/pyvarinf2_docs.py`` writes ``docs/_generated/`` before the sources are read:
the results tables (from whatever CSV/JSON/Markdown files exist under ``results/`` and
``benchmarks/results/``) and the notebook gallery (figures taken from the committed notebooks),
so those pages never break when files come and go.

Build exactly as CI does::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the package, even without an editable install
sys.path.insert(0, os.path.join(HERE, "_ext"))

project = "pyvarinf2"
author = "the pyvarinf2 authors"
copyright = "pyvarinf2 authors, MIT licence"

try:
    import pyvarinf2
    release = pyvarinf2.__version__
except Exception:  # pragma: no cover - autodoc will report the import error itself
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "pyvarinf2_docs",
]

# No network: mathjax is referenced by URL in the HTML pages (read by the browser), nothing is
# fetched at build time; no intersphinx.
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path = []

# autodoc / napoleon
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_mock_imports = []
autoclass_content = "both"
napoleon_google_docstring = True
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# A few names in docstrings refer to torch objects that are not documented here; keep -W useful
# by not resolving cross-references into other projects (nitpicky stays off).
nitpicky = False

# MathJax: shorthands used on the maths pages
mathjax3_config = {
    "tex": {
        "macros": {
            "KL": r"\mathrm{KL}",
            "E": r"\mathbb{E}",
            "N": r"\mathcal{N}",
            "diag": r"\operatorname{diag}",
            "tr": r"\operatorname{tr}",
        }
    }
}

html_theme = "alabaster"
html_title = f"pyvarinf2 {release}"
html_theme_options = {
    "description": "Variational Bayesian deep learning for PyTorch",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_static_path = []
html_show_sourcelink = False
