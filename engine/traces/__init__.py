"""Routing traces: the trace file format, cache-policy replay and trace-driven routing."""

from moe_serve.engine.exports import lazy_exports

_NAMES = {
    "RoutingTrace": "trace_file", "load_trace": "trace_file", "save_trace": "trace_file",
    "KNOWN_GEOMETRIES": "trace_file", "ReplayResult": "replay", "replay": "replay", "simulate": "replay",
    "TraceRouter": "trace_router",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
