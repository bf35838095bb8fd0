"""`python -m moe_serve.cache_policies.build`: compiles the native cache policy ahead of time (for
images without a compiler at run time); exits non-zero if it cannot."""

from __future__ import annotations

import logging

from moe_serve.cache_policies.native_context import native_library


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if native_library() is None:
        raise SystemExit("the native cache policy could not be built (see the warning above)")


if __name__ == "__main__":
    main()
