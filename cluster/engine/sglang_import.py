"""The one place expertmesh imports SGLang's radix cache.

SGLang's `RadixCache` API breaks often between releases (0.5.23 is pinned), and on a CPU-only torch
its import chain (radix_cache → memory_pool → configs) runs a top-level `import torchvision` that
PyPI's torchvision cannot satisfy beside torch+cpu. This module imports it once, serving inert
`torchvision*` stand-ins only for the duration of the import when no working torchvision exists,
and undoes every process-wide change the import makes outside SGLang's own modules.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import sys
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
_INSTALL_HINT = (
    f"run scripts/setup.sh, which installs torch first, then `pip install --no-deps "
    f"sglang=={SGLANG_VERSION}` and its import-time dependencies "
    f"(see sglang-{SGLANG_VERSION}-radix-cpu-requirements.txt)"
)
_STANDIN_MARK = "__expertmesh_standin__"
_MISSING = object()


@dataclass(frozen=True)
class SGLangRadix:
    """The SGLang names expertmesh uses; typed as Any because SGLang's own types churn."""

    version: str
    RadixCache: Any
    RadixKey: Any
    TreeNode: Any
    CacheInitParams: Any
    MatchPrefixParams: Any
    InsertParams: Any
    EvictParams: Any
    TokenToKVPoolAllocator: Any
    PagedTokenToKVPoolAllocator: Any
    used_torchvision_standin: bool


class _InertMeta(type):
    """Any attribute is another inert class; calling one fails loudly (so misuse is visible)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{cls.__qualname__} is an expertmesh stand-in: torchvision was not importable when "
            "SGLang was imported (CPU-only torch); this SGLang code path needs a real torchvision"
        )


def _inert(qualname: str) -> type:
    cls = _InertMeta(qualname.rsplit(".", 1)[-1], (), {})
    cls.__qualname__ = qualname
    return cls


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{self.__name__}.{name}")


class _TorchvisionStandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision` and any `torchvision.*` as an empty package of inert attributes."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        setattr(module, _STANDIN_MARK, True)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _torchvision_modules() -> list[str]:
    return [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]


def real_torchvision_usable() -> bool:
    """True when a real torchvision imports beside this torch (GPU images); cleans up a failed try."""
    loaded = sys.modules.get("torchvision")
    if loaded is not None and not getattr(loaded, _STANDIN_MARK, False):
        return True
    if "torchvision" in sys.modules:  # None (blocked) or a stand-in: treat as absent
        return False
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return True
    except Exception as exc:  # PyPI torchvision beside torch+cpu: "operator torchvision::nms does not exist"
        for name in _torchvision_modules():
            del sys.modules[name]
        logger.info("torchvision is installed but does not import (%s: %s); treating it as absent",
                    type(exc).__name__, exc)
        return False


def _pin_transformers_torchvision_off() -> None:
    """Make transformers' cached is_torchvision_available() False before stand-ins exist.

    transformers probes torchvision with find_spec; with the stand-in finder active it would see
    one, cache True, and later call into the stand-ins. A None entry in sys.modules makes
    find_spec answer "absent" while we (re)compute the cached answers.
    """
    try:
        from transformers.utils import import_utils
    except ImportError:
        return
    probes = [getattr(import_utils, n, None)
              for n in ("is_torchvision_available", "is_torchvision_v2_available")]
    probes = [p for p in probes if p is not None and hasattr(p, "cache_clear")]
    saved = sys.modules.get("torchvision", _MISSING)
    sys.modules["torchvision"] = None  # type: ignore[assignment]
    try:
        for probe in probes:
            if probe():
                probe.cache_clear()
                probe()
                logger.info("reset transformers' cached %s() to False", probe.__name__)
    finally:
        if saved is _MISSING:
            sys.modules.pop("torchvision", None)
        else:
            sys.modules["torchvision"] = saved



@contextlib.contextmanager
def torchvision_standin() -> Iterator[None]:
    """Serve inert torchvision modules inside the block only; remove the finder and modules after."""
    _pin_transformers_torchvision_off()
    finder = _TorchvisionStandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        removed = [n for n in _torchvision_modules()
                   if getattr(sys.modules[n], _STANDIN_MARK, False) or sys.modules[n] is None]
        for name in removed:
            del sys.modules[name]
        logger.info("removed the torchvision stand-in finder and %d stand-in module(s): %s",
                    len(removed), ", ".join(sorted(removed)) or "-")


@contextlib.contextmanager
def _restore_environ() -> Iterator[None]:
    """SGLang sets cache-dir variables at import (TORCHINDUCTOR_CACHE_DIR, CUDA_CACHE_PATH, ...).

    They would redirect torch.compile and CUDA caches process-wide and leak into child processes;
    the radix cache never compiles anything, so put the environment back as it was.
    """
    before = dict(os.environ)
    try:
        yield
    finally:
        changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
        for key in changed:
            if key in before:
                os.environ[key] = before[key]
            else:
                del os.environ[key]
        if changed:
            logger.debug("undid environment variables set by the SGLang import: %s", ", ".join(changed))


@functools.lru_cache(maxsize=1)
def import_radix_cache() -> SGLangRadix:
    """Import SGLang's radix cache and allocators once per process (5–7 s on CPU)."""
    if importlib.util.find_spec("sglang") is None:
        raise ImportError(f"sglang is not installed; {_INSTALL_HINT}")
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != SGLANG_VERSION:
        logger.warning("sglang %s is installed; expertmesh is written against %s (its RadixCache "
                       "API changes between releases)", version, SGLANG_VERSION)

    use_standin = not real_torchvision_usable()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_restore_environ())
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        if use_standin:
            stack.enter_context(torchvision_standin())
        try:
            from sglang.srt.mem_cache import radix_cache
            from sglang.srt.mem_cache.allocator import (
                PagedTokenToKVPoolAllocator,
                TokenToKVPoolAllocator,
            )
            from sglang.srt.mem_cache.base_prefix_cache import (
                EvictParams,
                InsertParams,
                MatchPrefixParams,
            )
            from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        except ImportError as exc:
            raise ImportError(f"importing sglang {version}'s radix cache failed ({exc}); "
                              f"{_INSTALL_HINT}") from exc
    if caught:  # e.g. "Only CUDA, HIP and XPU support AWQ currently": noise on CPU
        logger.debug("%d warning(s) during the sglang import: %s", len(caught),
                     "; ".join(sorted({str(w.message) for w in caught})))
    logger.info("imported sglang %s radix cache in %.1f s (%s)", version,
                time.perf_counter() - started,
                "torchvision stand-ins" if use_standin else "real torchvision")
    return SGLangRadix(
        version=version,
        RadixCache=radix_cache.RadixCache,
        RadixKey=radix_cache.RadixKey,
        TreeNode=radix_cache.TreeNode,
        CacheInitParams=CacheInitParams,
        MatchPrefixParams=MatchPrefixParams,
        InsertParams=InsertParams,
        EvictParams=EvictParams,
        TokenToKVPoolAllocator=TokenToKVPoolAllocator,
        PagedTokenToKVPoolAllocator=PagedTokenToKVPoolAllocator,
        used_torchvision_standin=use_standin,
    )
