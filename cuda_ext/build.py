"""Ahead-of-time build of the copy-engine extension into its cache dir (for images and installs).

Run `python -m moe_serve.cuda_ext.build` after installing; the server's first start then skips the compile.
"""

from __future__ import annotations

import argparse
import logging

import torch

from moe_serve.cuda_ext.native import build_dir, load_extension

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """Builds the CPU flavour, and the CUDA flavour when CUDA is available or --cuda is given."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda", action="store_true", help="build the CUDA flavour even without a visible GPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flavours = [False] + ([True] if args.cuda or torch.cuda.is_available() else [])
    for with_cuda in flavours:
        load_extension(with_cuda)
        logger.info("built %s flavour in %s", "cuda" if with_cuda else "cpu", build_dir(with_cuda))


if __name__ == "__main__":
    main()
