"""alignpipe: online alignment as a loop of restartable stages exchanging fixed-schema datasets on disk.

Layout. The repository keeps `stages/`, `schemas/` and `pipelines/` next to `alignpipe/`; an installed wheel
holds them as `alignpipe.stages`, `alignpipe.schemas` and `alignpipe.pipelines` (the package-dir mapping of
pyproject.toml), so nothing but `alignpipe*` lands in site-packages. `alignpipe.stages` etc. is the one import
spelling. In a source checkout `_SourceLayout` resolves those names to the folders at the repository root, and
keeps the old top-level spellings (`import stages`, `from schemas import ...`) as aliases of the same module
objects; an installed wheel registers nothing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_SUBPACKAGES = ("stages", "schemas", "pipelines")
_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
SOURCE_CHECKOUT = not (_HERE / "stages").is_dir() and (_ROOT / "stages" / "__init__.py").is_file()

# The recipes, their data and the judge templates: alignpipe/pipelines when installed, ./pipelines in a checkout.
PIPELINES_DIR = (_ROOT if SOURCE_CHECKOUT else _HERE) / "pipelines"


class _Alias(importlib.abc.Loader):
    """Loads `stages.x` as the very module object `alignpipe.stages.x` (one copy, one module state)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.real_spec  # module_from_spec stamped the alias spec on it


class _SourceLayout(importlib.abc.MetaPathFinder):
    """Source checkout only: `alignpipe.stages` -> ./stages, and `stages` -> `alignpipe.stages` (alias)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, rest = fullname.partition(".")
        if head == "alignpipe" and rest in _SUBPACKAGES:
            folder = _ROOT / rest
            return importlib.util.spec_from_file_location(
                fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])
        if head in _SUBPACKAGES:
            real = importlib.util.find_spec(f"alignpipe.{fullname}")
            if real is None:
                return None
            return importlib.util.spec_from_loader(fullname, _Alias(f"alignpipe.{fullname}"),
                                                   is_package=real.submodule_search_locations is not None)
        return None


if SOURCE_CHECKOUT and not any(isinstance(f, _SourceLayout) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceLayout())
