"""An OpenAI-compatible HTTP server that streams interleaved text and images (`tokenloom serve`).

    from tokenloom.serve import ServeSettings, create_app, ServerThread
    with ServerThread(create_app(ServeSettings(model="path/to/model"))) as server:
        ...  # server.url: POST /v1/chat/completions, POST /v1/images/generations, GET /v1/models, ...

One engine thread owns the model and a ContinuousBatcher; HTTP handlers (FastAPI on uvicorn) check
requests, take a place in a bounded queue (429 past it) and read their events back through asyncio
queues. Needs the `fastapi` and `uvicorn` packages.
"""

from .app import answer_content, create_app
from .errors import APIError
from .runner import ServerThread, bind_socket, uvicorn_server
from .settings import ServeSettings

__all__ = ["APIError", "ServeSettings", "ServerThread", "answer_content", "bind_socket", "create_app",
           "uvicorn_server"]
