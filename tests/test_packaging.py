"""adapters/ and persistence/ install only under the package: no generic top-level modules."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_generic_names_are_not_importable_top_level():
    # Run from / so the checkout's own directories are not on sys.path.
    code = "import importlib.util as u; print(u.find_spec('adapters'), u.find_spec('persistence'))"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert printed.stdout.split() == ["None", "None"]


def test_subpackages_import_under_the_package():
    assert importlib.util.find_spec("fot_memory_plugin.adapters") is not None
    assert importlib.util.find_spec("fot_memory_plugin.persistence") is not None
