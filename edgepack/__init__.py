"""edgepack: one command from a PyTorch model to mobile artifacts with 4-bit weights."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _mount_top_level_folders() -> None:
    """Make the repository's top-level exporters/ and packaging/ import as edgepack.*.

    They have no __init__.py on purpose: a regular package named `packaging` at the
    repository root would shadow PyPI's `packaging` (which pip, torch and transformers
    import) whenever the root is on sys.path. An installed wheel already has them inside
    edgepack/ (pyproject's package-dir), so nothing is mounted there.
    """
    here = Path(__file__).resolve().parent
    for name in ("exporters", "packaging"):
        fullname = f"{__name__}.{name}"
        folder = here.parent / name
        if fullname in sys.modules or (here / name).is_dir() or not folder.is_dir():
            continue
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        setattr(sys.modules[__name__], name, module)


_mount_top_level_folders()
