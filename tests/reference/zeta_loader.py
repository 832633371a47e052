"""Load Zeta's published ``MultiQueryAttention`` without importing the ``zeta`` package.

Why this exists
---------------
The reference for mqaserve is the ``MultiQueryAttention`` class in
``zeta/nn/attention/multiquery_attention.py`` of the *zetascale* package. That file
only needs ``torch``, ``einops``, ``packaging`` and its sibling ``base.py``. But
``import zeta`` runs ``zeta/__init__.py``, which imports nearly the whole library
and with it a long list of heavy or version-pinned dependencies (bitsandbytes,
transformers<5, torchvision, scikit-learn, beartype, vector-quantize-pytorch, ...).
``zeta/nn/__init__.py`` and ``zeta/nn/attention/__init__.py`` do the same. We
install zetascale with ``--no-deps`` and never execute any of those ``__init__``
files.

Instead, ``load_zeta_mqa()``:

1. finds the installed package directory with ``importlib.util.find_spec('zeta')``
   (for a top-level name this locates the package without executing it);
2. registers empty placeholder package modules ``zeta``, ``zeta.nn`` and
   ``zeta.nn.attention`` in ``sys.modules`` whose ``__path__`` points at the real
   installed directories;
3. imports ``zeta.nn.attention.multiquery_attention`` normally. Python's import
   system finds the parents already in ``sys.modules`` and loads the real
   published file (and ``zeta.nn.attention.base``, which it imports) from disk.

The placeholders stay registered so the loaded module keeps working. If a real
``zeta`` package has already been imported in this process it is used as is.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

_MQA_MODULE = "zeta.nn.attention.multiquery_attention"
_PACKAGES = ("zeta", "zeta.nn", "zeta.nn.attention")


class ZetaNotInstalledError(ImportError):
    """zetascale (the ``zeta`` package) is not installed in this environment."""


def _zeta_root() -> str:
    try:
        spec = importlib.util.find_spec("zeta")
    except (ImportError, ValueError) as exc:  # pragma: no cover - unusual setups
        raise ZetaNotInstalledError(f"cannot locate the 'zeta' package: {exc}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise ZetaNotInstalledError(
            "zetascale is not installed (no 'zeta' package found). Install it without its "
            "dependencies into the project venv, e.g. "
            "`.venv/bin/pip install --no-deps zetascale`, plus torch, einops and packaging."
        )
    root = list(spec.submodule_search_locations)[0]
    target = os.path.join(root, *_MQA_MODULE.split(".")[1:]) + ".py"
    if not os.path.isfile(target):
        raise ZetaNotInstalledError(
            f"the installed zeta package at {root} has no {target}; "
            "this zetascale version does not ship MultiQueryAttention there"
        )
    return root


def _register_placeholder(name: str, path: str) -> None:
    existing = sys.modules.get(name)
    if existing is not None:
        if getattr(existing, "__path__", None) is None:
            raise ImportError(f"sys.modules[{name!r}] exists but is not a package")
        return
    module = types.ModuleType(name, f"placeholder for {name}; its __init__ is not executed")
    module.__path__ = [path]
    spec = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    spec.submodule_search_locations = [path]
    module.__spec__ = spec
    module.__package__ = name
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def load_zeta_module() -> types.ModuleType:
    """Return the real ``zeta.nn.attention.multiquery_attention`` module object."""
    if _MQA_MODULE in sys.modules:
        return sys.modules[_MQA_MODULE]
    root = _zeta_root()
    for name in _PACKAGES:
        rel = name.split(".")[1:]
        _register_placeholder(name, os.path.join(root, *rel))
    return importlib.import_module(_MQA_MODULE)


def load_zeta_mqa():
    """Return ``(MultiQueryAttention, module)`` from the installed zetascale package.

    ``module`` is ``zeta.nn.attention.multiquery_attention`` itself, which also
    provides ``gen_slopes`` and ``build_alibi_bias``. Raises
    ``ZetaNotInstalledError`` (an ``ImportError``) when zetascale is missing.
    """
    module = load_zeta_module()
    return module.MultiQueryAttention, module


__all__ = ["ZetaNotInstalledError", "load_zeta_module", "load_zeta_mqa"]
