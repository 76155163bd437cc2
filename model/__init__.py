"""TransformerFAM over Hugging Face Llama-family checkpoints. Public API:

    rt = FamRuntime.load()                      # default model, offline
    state = rt.new_state()                      # an empty document
    state, logits = rt.ingest(state, rt.encode(text))
    for piece in generate(rt, state, rt.encode(question), SamplingParams(temperature=0)): ...
"""

from model.config import ArchConfig, FamConfig
from model.decode import DecodeBatch
from model.generate import Generation, SamplingParams, generate
from model.runtime import FamRuntime, StateMismatchError
from model.state import FamState

__all__ = ["ArchConfig", "DecodeBatch", "FamConfig", "FamRuntime", "FamState", "Generation", "SamplingParams",
           "StateMismatchError", "generate"]
