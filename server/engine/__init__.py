"""The inference engine: sessions, their snapshots, documents, and the model worker that schedules work across
sessions. No HTTP here: the server package adapts this interface to routes (see `server.app`)."""

from model.generate import TokenLogprob
from server.engine.config import EngineConfig
from server.engine.documents import TokenizedDocument
from server.engine.engine import Engine
from server.engine.errors import Cancelled, EngineError, QueueFull
from server.engine.jobs import Echoed, Failed, Finished, GenerationResult, IngestJob, Job, Progress, TextDelta
from server.engine.store import SessionInfo

__all__ = ["Cancelled", "Echoed", "Engine", "EngineConfig", "EngineError", "Failed", "Finished", "GenerationResult",
           "IngestJob", "Job", "Progress", "QueueFull", "SessionInfo", "TextDelta", "TokenLogprob",
           "TokenizedDocument"]
