"""`moe-serve serve` (the real CLI) whose model raises a CUDA device fault once told to.

    python -m tests.e2e.faulty_engine MARKER_FILE serve --model ... [flags]

Every model step after MARKER_FILE appears raises the RuntimeError a CUDA illegal memory access
raises in torch, as a real device fault would, for the fatal-fault test of the server's lifecycle.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from moe_serve.engine import builder
from moe_serve.server.cli import main

DEVICE_FAULT = "CUDA error: an illegal memory access was encountered"


def build_faulty_engine(marker: Path) -> Any:
    """`moe_serve.engine.builder.build_engine`, with the model's forward raising DEVICE_FAULT once `marker` exists."""
    build_engine = builder.build_engine

    def build(config: Any, show_progress: bool = True) -> Any:
        built = build_engine(config, show_progress)
        model = built.runner.model
        forward = model.forward

        def faulty_forward(*args: Any, **kwargs: Any) -> Any:
            if marker.exists():
                raise RuntimeError(DEVICE_FAULT)
            return forward(*args, **kwargs)

        model.forward = faulty_forward
        return built

    return build


if __name__ == "__main__":
    builder.build_engine = build_faulty_engine(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
