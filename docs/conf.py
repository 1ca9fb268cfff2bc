"""Sphinx configuration of the vidtok_jax documentation (`make docs`).

MyST Markdown pages, the book theme, autodoc for the API reference, and myst-nb for the pages
that are notebooks: those are executed at every build, on the machine that builds the site.
"""

import os
import sys

# The repository root, so autodoc imports the checkout's vidtok_jax (also when it is not
# installed in the docs environment) and the notebooks can read configs/.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "vidtok_jax"
author = "vidtok_jax developers"
copyright = "vidtok_jax developers (MIT License)"

extensions = [
    "myst_nb",  # MyST Markdown pages and executed notebooks (it brings myst_parser itself)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the "Args:" sections of the Google-style docstrings
    "sphinx.ext.viewcode",
]

# Not part of the site: build output, notebook checkpoints.
exclude_patterns = ["_build", "requirements.txt", "**.ipynb_checkpoints",
                    "Thumbs.db", ".DS_Store"]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3  # `[text](page.md#a-section)` links to sections

# Notebooks run at every build ("force": no stale outputs). A cell that raises fails the build.
nb_execution_mode = "force"
nb_execution_timeout = 300  # seconds per cell; the getting-started page needs about a minute
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# The docstrings use Markdown-style `code` spans; render single backticks as code, not italics.
default_role = "code"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "vidtok_jax"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path = []

