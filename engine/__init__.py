"""The inference engine: loads a causal LM and runs requests with KV caching and prefix caching.

It owns the model, the tokenizer, the request flow and its timings; the radix tree is ``cache/``
and the web UI is ``app.py``.
"""

from engine.config import EngineConfig
from engine.engine import Engine, GenerationRequest, GenerationResult, final_result
from engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "GenerationResult", "SamplingParams", "final_result"]
