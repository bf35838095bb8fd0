"""The inference engine: `core` (engine loop, scheduler, sampling), `model` (checkpoints and the
forward pass), `offload` (host and device expert tiers), `prefetch` (expert prediction), `traces`
(routing traces and replay); `builder` wires them from an `EngineConfig`."""
