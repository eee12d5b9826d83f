"""`b"".join` for the heads failproxy builds (headers.py): two twins behind one name, chosen at
import as telemetry/accessline.py chooses its renderer.

`join` is the Cython one (`_bytesjoin.pyx`: one allocation, a memcpy per piece) where it was
built and the build runs compiled, `join_py` (`b"".join` itself) otherwise. Same bytes, same
errors (tests/test_bytesjoin.py). `BUILT` says which one runs.
"""

from __future__ import annotations

from collections.abc import Callable

join_py: Callable[[list[bytes]], bytes] = b"".join


def _select() -> tuple[Callable[[list[bytes]], bytes], str]:
    try:
        from failproxy.proxy._bytesjoin import join as compiled  # type: ignore[import-not-found]
    except ImportError:
        return join_py, "pure"
    return compiled, "cython"


join, BUILT = _select()
