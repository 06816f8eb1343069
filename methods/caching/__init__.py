"""Feature caches (one file per method), each composed with a registered solver; importing registers them."""

from methods.caching import deepcache, first_block_cache, fora, taylorseer  # noqa: F401
