"""Memory tiers: one protocol (Store), several tiers, chosen by name with open_store."""

from nvmlib.backends.base import Store
from nvmlib.backends.registry import TIERS, available_tiers, open_store, tier_class

__all__ = ["Store", "TIERS", "available_tiers", "open_store", "tier_class"]
