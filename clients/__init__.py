"""Python client and ``fam`` command line for fam-server.

from clients import Client
with Client("http://127.0.0.1:8000") as fam:
    session = fam.create_session()
    fam.ingest_file(session.id, "report.pdf")
    print(fam.chat([{"role": "user", "content": "Summarise it."}], session_id=session.id).text)
"""

from clients.client import AsyncClient, Client
from clients.errors import FamError
from clients.streams import AsyncTextStream, TextStream
from clients.types import Completion, IngestProgress, Model, Session, Usage

__all__ = [
    "AsyncClient",
    "AsyncTextStream",
    "Client",
    "Completion",
    "FamError",
    "IngestProgress",
    "Model",
    "Session",
    "TextStream",
    "Usage",
]
