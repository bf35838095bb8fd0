"""Grammar-constrained decoding: the spec a request carries (`spec`), its compilation against the
engine's tokenizer with a bounded cache (`compiler`), and each sequence's matcher and token masks
(`matcher`). See docs/structured_outputs.md."""

from moe_serve.engine.exports import lazy_exports

_NAMES = {"GuidedDecoding": "spec", "GuidedKind": "spec", "GuidedCompileError": "spec"}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
