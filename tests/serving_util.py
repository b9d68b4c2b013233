"""Helpers for serving tests: run the real app (real engine) in-process on a free loopback port."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

from medtune.serving.launch import free_port


@contextmanager
def running_app(cfg, guard=None, api_key: str | None = None):
    """Start Service + FastAPI app under uvicorn in a thread; yield (base_url, service, app)."""
    import uvicorn

    from medtune.serving.api import create_app
    from medtune.serving.service import Service

    service = Service(cfg, guard=guard)
    app = create_app(service, api_key=api_key)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    loop_box: dict = {}

    async def main():
        loop_box["loop"] = asyncio.get_running_loop()
        await service.start()
        await server.serve()
        await service.shutdown()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not (service.ready and server.started):
        if service.error:
            raise RuntimeError(service.error)
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", service, app, loop_box["loop"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
