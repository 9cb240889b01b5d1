"""`python -m serving.engine.kernels`: build every CPU kernel into the cache now (what `make install`
runs), so no worker compiles on its first request; prints how they stand."""

from __future__ import annotations

import logging

from serving.engine.kernels import status

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(f"CPU kernels: {status()}")
