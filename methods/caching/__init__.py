"""Feature caches (one file per method), each composed with a registered solver; importing registers them."""

from methods.caching import (  # noqa: F401
    block_caching,
    dbcache,
    deepcache,
    delta_dit,
    fastercache,
    first_block_cache,
    fora,
    magcache,
    pab,
    taylorseer,
    teacache,
    toca,
)
