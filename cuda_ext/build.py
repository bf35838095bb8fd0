"""Ahead-of-time build of the copy-engine extension into its cache dir (for images and installs).

Run `python -m moe_serve.cuda_ext.build` after installing; the server's first start then skips the
compile. `--check` compiles nothing: it imports the prebuilt flavours as the server will (exit 1
unless each loads, the CUDA one built with its CUDA engine), e.g. in an image without a compiler.
"""

from __future__ import annotations

import argparse
import logging

import torch

from moe_serve.cuda_ext.api import CopyBackend
from moe_serve.cuda_ext.native import build_dir, import_prebuilt, load_extension

logger = logging.getLogger(__name__)


def check(with_cuda: bool) -> CopyBackend:
    """The backend the prebuilt flavour provides, imported without compiling; raises if it does not load."""
    module = import_prebuilt(with_cuda)
    if bool(module.with_cuda) != with_cuda:
        raise RuntimeError(f"the prebuilt {'cuda' if with_cuda else 'cpu'} flavour was built "
                           f"{'without' if with_cuda else 'with'} CUDA")
    return CopyBackend.CUDA if with_cuda else CopyBackend.CPU_EXTENSION


def main(argv: list[str] | None = None) -> int:
    """Builds (or, with --check, imports) the CPU flavour, and the CUDA flavour when CUDA is
    available or --cuda is given."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda", action="store_true", help="the CUDA flavour too, even without a visible GPU")
    parser.add_argument("--check", action="store_true", help="import the prebuilt flavours, compile nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flavours = [False] + ([True] if args.cuda or torch.cuda.is_available() else [])
    for with_cuda in flavours:
        if args.check:
            try:
                backend = check(with_cuda)
            except (RuntimeError, ImportError, OSError) as error:
                logger.error("copy engine check failed: %s", error)
                return 1
            logger.info("prebuilt %s flavour loads without compiling: backend=%s", "cuda" if with_cuda else "cpu",
                        backend.value)
        else:
            load_extension(with_cuda)
            logger.info("built %s flavour in %s", "cuda" if with_cuda else "cpu", build_dir(with_cuda))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
