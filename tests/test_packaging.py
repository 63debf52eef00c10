"""Packaging: adapters/ and persistence/ install only under the package (no generic top-level
modules); llama-index's import paths are PEP 420 namespace portions that shadow nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest


def test_generic_names_are_not_importable_top_level():
    # Run from / so the checkout's own directories are not on sys.path.
    code = "import importlib.util as u; print(u.find_spec('adapters'), u.find_spec('persistence'))"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert printed.stdout.split() == ["None", "None"]


def test_subpackages_import_under_the_package():
    assert importlib.util.find_spec("fot_memory_plugin.adapters") is not None
    assert importlib.util.find_spec("fot_memory_plugin.persistence") is not None


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject's explicit `packages` list must name every folder of the package, or the wheel
    silently leaves it out (the editable install would still find it)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "fot_memory_plugin").rglob("__init__.py")
             if "_namespace" not in init.parts}
    assert found - listed == set()


@pytest.mark.parametrize(("old", "new"), [("engine", "core.engine"), ("index", "integrations.llama_index.index"),
                                          ("cli", "apps.cli"), ("passages", "documents.passages")])
def test_flat_module_paths_of_0_1_still_import(old, new):
    """`fot_memory_plugin.engine` and the other flat paths are the moved modules themselves, with a warning."""
    new_module = importlib.import_module(f"fot_memory_plugin.{new}")
    sys.modules.pop(f"fot_memory_plugin.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_module = importlib.import_module(f"fot_memory_plugin.{old}")
    assert old_module is new_module and old_module.__spec__.name == f"fot_memory_plugin.{new}"
    assert any(f"fot_memory_plugin.{new}" in str(warning.message) for warning in caught)


def test_package_level_names_import_lazily():
    code = ("import sys, fot_memory_plugin as f; assert 'torch' not in sys.modules, 'eager'; "
            "from fot_memory_plugin import MemoryEngine, load_model, FoTMemoryIndex, DocumentMemory; "
            "from fot_memory_plugin.core import MemoryConfig; from fot_memory_plugin.models import read_delta; "
            "from fot_memory_plugin.integrations.llama_index import FoTMemoryLLM, MiniLMEmbedding; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --- llama-index's conventional import paths (PEP 420 namespace portions) ------------------------

ROOT = Path(__file__).resolve().parents[1]
_IMPORTS = (
    "import json, llama_index.core, llama_index.llms.fot_memory as llms, llama_index.memory.fot_memory as memory\n"
    "from llama_index.llms.fot_memory import FoTMemoryLLM\n"
    "from llama_index.memory.fot_memory import FoTDocumentMemoryBlock\n"
    "from llama_index.core.llms import CustomLLM\n"
    "from llama_index.core.memory.memory import BaseMemoryBlock\n"
    "assert issubclass(FoTMemoryLLM, CustomLLM) and issubclass(FoTDocumentMemoryBlock, BaseMemoryBlock)\n"
    "import importlib, sys\n"
    "other = importlib.import_module(sys.argv[1]) if len(sys.argv) > 1 else None\n"
    "print(json.dumps({'core': llama_index.core.__file__, 'llms': llms.__file__, 'memory': memory.__file__,\n"
    "                  'other': other and other.__file__, 'other_value': other and other.VALUE}))\n"
)


def _fake_integration(tmp_path: Path) -> Path:
    """Install a separate llama_index.llms.* distribution into a target directory, as pip would."""
    source = tmp_path / "other-src"
    package = source / "llama_index" / "llms" / "other_vendor"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 'other vendor'\n")
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "llama-index-llms-other-vendor"\nversion = "0.1.0"\n'
        '[tool.setuptools]\npackages = ["llama_index.llms.other_vendor"]\n'
    )
    target = tmp_path / "other-target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)], check=True, timeout=300)
    return target


def _imports(pythonpath: list[Path], *args: str) -> dict:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    done = subprocess.run([sys.executable, "-c", _IMPORTS, *args], capture_output=True, text=True, cwd="/",
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_namespace_imports_work_beside_other_llama_index_packages(tmp_path):
    """The installed checkout (editable in development): ours, llama-index-core and another
    vendor's llama_index.llms.* package all import together; nothing is shadowed."""
    other = _fake_integration(tmp_path)
    found = _imports([other], "llama_index.llms.other_vendor")
    assert found["other_value"] == "other vendor" and found["other"].startswith(str(other))
    assert "site-packages" in found["core"]
    assert found["llms"].endswith(os.path.join("llama_index", "llms", "fot_memory", "__init__.py"))
    assert found["memory"].endswith(os.path.join("llama_index", "memory", "fot_memory", "__init__.py"))


def test_wheel_installs_namespace_portions_without_init_files(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("fot_memory_plugin", "adapters", "persistence"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(wheels), str(source)], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = wheels.glob("fot_memory_plugin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llama_index/llms/fot_memory/__init__.py" in names
    assert "llama_index/memory/fot_memory/__init__.py" in names
    for shared in ("llama_index/__init__.py", "llama_index/llms/__init__.py", "llama_index/memory/__init__.py"):
        assert shared not in names, f"the wheel would shadow every other llama_index package with {shared}"
    assert not any(name.startswith("fot_memory_plugin/_namespace") for name in names)
    assert not any(name.split("/")[0] in ("adapters", "persistence") for name in names)
    assert "fot_memory_plugin/models/deltas/smollm2-fot/delta.safetensors" in names  # load_model("smollm2-fot")
    assert "fot_memory_plugin/models/deltas/smollm2-fot/fot_config.json" in names
    for package in ("core", "models", "documents", "integrations/llama_index", "apps", "training", "distributed"):
        assert f"fot_memory_plugin/{package}/__init__.py" in names
    _check_metadata(zipfile.ZipFile(wheel), names)
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    other = _fake_integration(tmp_path)
    found = _imports([target, other], "llama_index.llms.other_vendor")
    assert found["llms"].startswith(str(target)) and found["memory"].startswith(str(target))
    assert found["other_value"] == "other vendor" and "site-packages" in found["core"]


def _check_metadata(wheel: zipfile.ZipFile, names: set[str]) -> None:
    """PEP 639 licence metadata, classifiers, URLs, and ranges (never exact pins) for dependencies."""
    (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    metadata = wheel.read(metadata_name).decode()
    fields = [line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line]
    values = lambda key: [value for name, value in fields if name == key]  # noqa: E731
    assert values("License-Expression") == ["MIT"] and values("License-File") == ["LICENSE"]
    assert not values("License")  # the legacy free-text field
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "Development Status :: 3 - Alpha" in values("Classifier")
    assert any(url.startswith("Paper, https://arxiv.org/abs/2307.03170") for url in values("Project-URL"))
    requires = values("Requires-Dist")
    assert "hnswlib<0.9,>=0.8" in requires and "transformers<6,>=5.17" in requires
    assert not [need for need in requires if "==" in need.split(";")[0]], "exact pins belong in constraints.txt"
    assert "fot_memory_plugin/py.typed" in names


def test_llamahub_lists_what_its_import_path_exports():
    """[tool.llamahub]'s classes all import from its import_path (what LlamaHub shows users)."""
    llamahub = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["llamahub"]
    module = importlib.import_module(llamahub["import_path"])
    assert set(llamahub["class_authors"]) == {"FoTMemoryLLM", "FoTMemoryIndex", "FoTDocumentMemoryBlock"}
    for name in llamahub["class_authors"]:
        assert name in module.__all__ and getattr(module, name).__module__.startswith("fot_memory_plugin.")
    memory = importlib.import_module("llama_index.memory.fot_memory")
    assert memory.FoTDocumentMemoryBlock is module.FoTDocumentMemoryBlock


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_beside_an_official_integration(tmp_path):
    """pip resolves the built wheel together with llama-index-core and the official
    llama-index-embeddings-huggingface (sentence-transformers 6, transformers 5), and both import.

    The fresh venv's base layer is this checkout's installed packages, as --system-site-packages
    gives a system's (a .pth file; the editable install of this checkout is not active there), so
    pip downloads only what the integration adds (from PyPI or pip's cache) and never a CUDA torch
    (constraints.txt). Takes a minute or two; needs PyPI unless pip's cache holds the packages.
    """
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(wheels), str(ROOT)], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = wheels.glob("fot_memory_plugin-*.whl")
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    base = next(path for path in sys.path if path.endswith("site-packages") and Path(path, "torch").is_dir())
    Path(site, "zz_base_layer.pth").write_text(base + "\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt"),
         str(wheel), "llama-index-core", "llama-index-embeddings-huggingface"],
        capture_output=True, text=True, timeout=900)
    if install.returncode != 0 and "ResolutionImpossible" not in install.stdout + install.stderr \
            and ("Could not find a version" in install.stderr or "NewConnectionError" in install.stderr):
        pytest.skip(f"PyPI unreachable and pip's cache lacks the integration: {install.stderr[-300:]}")
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    code = ("import fot_memory_plugin, llama_index.llms.fot_memory as ours\n"
            "from llama_index.embeddings.huggingface import HuggingFaceEmbedding\n"
            "from llama_index.core import VectorStoreIndex\n"
            "from fot_memory_plugin import MemoryEngine, load_model\n"
            "print(fot_memory_plugin.__file__); print(ours.__file__); print(HuggingFaceEmbedding.__module__)\n")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr
    ours, namespace, theirs = done.stdout.split()
    assert ours.startswith(str(venv)) and namespace.startswith(str(venv))  # the wheel, not the checkout
    assert theirs == "llama_index.embeddings.huggingface.base"
