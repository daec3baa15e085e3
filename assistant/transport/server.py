"""The process: `serve(cfg)` is `python -m assistant serve`; `running_server(...)` starts the same server in tests.

`serve` starts listening at once (`/healthz` says 503; the Wyoming port, when configured, answers `describe`),
loads the backend on the engine's worker thread (never on the loop, and on the one thread that will run the model),
attaches the session hub, optionally runs the MQTT bridge, and shuts down gracefully on SIGINT/SIGTERM: stop
accepting, let answers finish for `shutdown_grace_s`, cancel the rest, close every socket with 1001. The process's
shared parts are built here once: the engine, the hub and the voice (`SpeechPool`, shared by every transport).

    async with running_server(cfg.replace(**{"server.port": 0}), backend=backend) as srv:
        srv.ws_url      # "ws://127.0.0.1:PORT/v1/realtime"
        srv.http_url    # "http://127.0.0.1:PORT"
        srv.hub         # the SessionHub every transport shares
        srv.wyoming     # the Wyoming server when `wyoming.uri` is set (srv.wyoming.port)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from assistant.audio.voice import SpeechPool, installed_voices
from assistant.config import Config
from assistant.transport.hub import SessionHub
from assistant.transport.websocket import CLOSE_TIMEOUT_S, REALTIME_PATH, AssistantServer
from assistant.transport.wyoming import WyomingServer

log = logging.getLogger("assistant.server")


@dataclass
class RunningServer:
    host: str
    port: int
    ws_url: str
    http_url: str
    hub: SessionHub
    engine: Any
    app: AssistantServer
    voice: SpeechPool | None = None
    wyoming: WyomingServer | None = None


def speech_pool(cfg: Config) -> SpeechPool | None:
    """The process's one voice (loaded on first use), or None when speech is off or the voice is not installed."""
    name = cfg.voice.name
    if not name:
        return None
    if name not in installed_voices():
        log.warning("voice %r is not installed (pip install -e '.[voice]'): answers are text only", name)
        return None
    return SpeechPool(cfg.voice.params())


async def _start_wyoming(cfg: Config, voice: SpeechPool | None, app: AssistantServer) -> WyomingServer | None:
    if not cfg.wyoming.uri:
        return None
    wy = WyomingServer(cfg, voice)
    await wy.start()
    app.health_checks["wyoming"] = wy.health
    if voice is not None:
        voice.load()  # in the pool's thread: the first synthesis does not pay for it
    return wy


@contextlib.asynccontextmanager
async def running_server(cfg: Config, backend: Any = None, engine: Any = None) -> AsyncIterator[RunningServer]:
    """A real server on `cfg.server.host:port` around an already-loaded `backend` (or a started `engine`)."""
    from assistant.engine.engine import Engine

    own_engine = engine is None
    if own_engine:
        engine = Engine(backend, cfg.engine, cfg.generation)
        await engine.start()
    app = AssistantServer(cfg)
    await app.start()
    voice = speech_pool(cfg)
    wy = await _start_wyoming(cfg, voice, app)
    hub = app.attach(engine)
    if wy is not None:
        wy.attach(hub)
    scheme = "wss" if cfg.server.tls_cert else "ws"
    host = cfg.server.host
    try:
        yield RunningServer(
            host=host,
            port=app.port,
            ws_url=f"{scheme}://{host}:{app.port}{REALTIME_PATH}",
            http_url=f"{'https' if scheme == 'wss' else 'http'}://{host}:{app.port}",
            hub=hub,
            engine=engine,
            app=app,
            voice=voice,
            wyoming=wy,
        )
    finally:
        await _shutdown(cfg, app, wy, voice)
        if own_engine:
            await engine.stop()


_STOPPED_WHILE_LOADING = -1


def serve(cfg: Config) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 1 if the model failed to load."""
    status = asyncio.run(_serve_main(cfg))
    if status == _STOPPED_WHILE_LOADING:
        # The weights are still being read on the engine's (daemon) worker thread, inside native code that cannot be
        # interrupted; letting interpreter shutdown tear that thread down ended in abort (exit 134). The sockets are
        # closed and nothing else is left to clean up, so leave at once.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return status


async def _serve_main(cfg: Config) -> int:
    from assistant.backends import load_backend
    from assistant.engine.engine import Engine

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = AssistantServer(cfg)
    await app.start()
    scheme = "https" if cfg.server.tls_cert else "http"
    shown_host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "") else cfg.server.host
    base = f"{scheme}://{shown_host}:{app.port}"
    print(f"Voice assistant: open {base}/ in a browser (WebSocket {base.replace('http', 'ws', 1)}{REALTIME_PATH})")
    print(f"Loading the {cfg.model.backend} model; {base}/healthz answers 200 once it is ready.", flush=True)
    voice = speech_pool(cfg)
    wy: WyomingServer | None = None
    engine = Engine.loading(lambda: load_backend(cfg), cfg.engine, cfg.generation)
    mqtt_task: asyncio.Task[Any] | None = None
    try:
        try:
            wy = await _start_wyoming(cfg, voice, app)
        except OSError as e:  # the port is taken, the host is not ours
            log.error("could not start the Wyoming server on %s: %s", cfg.wyoming.uri, e)
            print(f"error: could not listen on wyoming.uri {cfg.wyoming.uri}: {e}", flush=True)
            return 1
        if wy is not None:
            services = ", ".join(wy.services())
            print(
                f"Wyoming (Home Assistant): port {wy.port} offers {services} (requests wait for the model)", flush=True
            )
        load = asyncio.create_task(engine.start())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([load, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not load.done():
            log.warning("stopped (signal) while loading the model; exiting without waiting for the load to finish")
            load.cancel()
            return _STOPPED_WHILE_LOADING
        try:
            load.result()
        except Exception as e:
            log.error("could not load the %s model: %s", cfg.model.backend, e)
            print(f"error: could not load the model: {e}", flush=True)
            return 1
        hub = app.attach(engine, model_name=cfg.model.backend)
        if wy is not None:
            wy.attach(hub)
        if cfg.mqtt.url:
            from assistant.transport.mqtt import run_mqtt_bridge

            mqtt_task = asyncio.create_task(run_mqtt_bridge(cfg, hub, stop, app.health_checks))  # supervised; /healthz
        print(f"Ready: {base}/", flush=True)
        await stop.wait()
    finally:
        log.info("shutting down")
        await _shutdown(cfg, app, wy, voice)
        if mqtt_task is not None:
            stop.set()
            try:
                await asyncio.wait_for(mqtt_task, cfg.server.shutdown_grace_s + CLOSE_TIMEOUT_S)
            except Exception as e:  # the bridge's failure must not hide a clean server stop
                log.warning("MQTT bridge ended with %r", e)
        if engine.ready:  # a load still running is abandoned with its daemon thread
            await engine.stop()
    return 0


async def _shutdown(cfg: Config, app: AssistantServer, wy: WyomingServer | None, voice: SpeechPool | None) -> None:
    """Every transport stops accepting and finishes its requests (for `shutdown_grace_s`) together."""
    parts = [app.shutdown()]
    if wy is not None:
        parts.append(wy.shutdown(cfg.server.shutdown_grace_s))
    await asyncio.gather(*parts)
    if voice is not None:
        voice.close()
