"""A real uvicorn server on 127.0.0.1 (free port, background thread) serving encoder routers under prefixes."""

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI

from engine_builder.serve.encoders.engine import EncoderEngine
from engine_builder.serve.encoders.routes import build_encoder_router
from engine_builder.serve.server.main import KEEP_ALIVE_S


def build_app(mounts: dict[str, tuple[EncoderEngine, str]]) -> FastAPI:
    """`mounts`: URL prefix -> (engine, served model name)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.gather(*(engine.start() for engine, _ in mounts.values()))
        yield
        await asyncio.gather(*(engine.shutdown() for engine, _ in mounts.values()))

    app = FastAPI(lifespan=lifespan)
    for prefix, (engine, name) in mounts.items():
        app.include_router(build_encoder_router(engine, served_model_name=name), prefix=prefix)
    return app


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` until the block ends; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=KEEP_ALIVE_S)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
