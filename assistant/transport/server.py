"""The process: `serve(cfg)` is `python -m assistant serve`; `running_server(...)` starts the same server in tests.

`serve` starts listening at once (`/healthz` says 503; the Wyoming port, when configured, answers `describe`), loads
the backend on the engine's worker thread (never on the loop, and on the one thread that will run the model) and the
voice (`[voice]`, on its pool's thread; without the `voice` extra the server says so in one log line and answers in
text), attaches the session hub, optionally runs the MQTT bridge, and shuts down gracefully on SIGINT/SIGTERM: stop
accepting, let answers finish for `shutdown_grace_s`, cancel the rest, close every socket with 1001. The voice pool
is one per process, shared by every transport (realtime sessions and Wyoming's `tts`).

    async with running_server(cfg.replace(**{"server.port": 0}), backend=backend) as srv:
        srv.ws_url      # "ws://127.0.0.1:PORT/v1/realtime"
        srv.http_url    # "http://127.0.0.1:PORT"
        srv.hub         # the SessionHub every transport shares
        srv.wyoming     # the Wyoming server when `wyoming.uri` is set (srv.wyoming.port)
    running_server(cfg, backend=backend, speech=pool)   # share one loaded voice pool between test servers
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from assistant.audio.voice import SpeechPool, open_pool
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
    wyoming: WyomingServer | None = None


async def _start_wyoming(cfg: Config, speech: SpeechPool | None, app: AssistantServer) -> WyomingServer | None:
    if not cfg.wyoming.uri:
        return None
    wy = WyomingServer(cfg, speech)
    await wy.start()
    app.health_checks["wyoming"] = wy.health
    return wy


async def _shutdown(cfg: Config, app: AssistantServer, wy: WyomingServer | None) -> None:
    """Every transport stops accepting and finishes its requests (for `shutdown_grace_s`) together."""
    await asyncio.gather(app.shutdown(), *([wy.shutdown(cfg.server.shutdown_grace_s)] if wy is not None else []))


@contextlib.asynccontextmanager
async def running_server(
    cfg: Config, backend: Any = None, engine: Any = None, speech: SpeechPool | None = None
) -> AsyncIterator[RunningServer]:
    """A real server on `cfg.server.host:port` around an already-loaded `backend` (or a started `engine`). The voice
    is `speech` when given, else `[voice]`'s (loaded here; none when `voice.name` is "")."""
    from assistant.engine.engine import Engine

    own_engine = engine is None
    if own_engine:
        engine = Engine(backend, cfg.engine, cfg.generation)
        await engine.start()
    own_speech = speech is None
    if own_speech:
        speech = open_pool(cfg.voice.params())
        if speech is not None:
            await asyncio.wrap_future(speech.load())
    app = AssistantServer(cfg)
    await app.start()
    wy = await _start_wyoming(cfg, speech, app)
    hub = app.attach(engine, speech=speech)
    watch_backend(app, engine)
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
            wyoming=wy,
        )
    finally:
        await _shutdown(cfg, app, wy)
        if own_engine:
            await engine.stop()
        if own_speech and speech is not None:
            speech.close()


def watch_backend(app: AssistantServer, engine: Any) -> None:
    """A backend with its own health (`openai`: are its model servers up?) gets a /healthz entry."""
    health = getattr(engine.backend, "health", None)
    if callable(health):
        app.health_checks["upstream"] = health


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
    speech = open_pool(cfg.voice.params())  # loads on its own thread, beside the model
    voice_loaded = speech.load() if speech is not None else None
    threads = cfg.engine_threads(speaking=speech is not None)
    log.info(
        "thread budget: %d torch threads for the engine, %s",
        threads,
        f"{cfg.voice.threads} for the voice" if speech else "no voice",
    )
    engine_cfg = dataclasses.replace(cfg.engine, threads=threads)
    engine = Engine.loading(lambda: load_backend(cfg), engine_cfg, cfg.generation)
    mqtt_task: asyncio.Task[Any] | None = None
    wy: WyomingServer | None = None
    try:
        try:
            wy = await _start_wyoming(cfg, speech, app)
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
        if voice_loaded is not None:
            try:
                await asyncio.wrap_future(voice_loaded)
            except Exception as e:  # a broken voice must not take the text answers down with it
                log.error("could not load voice %r: %s; answers are text only", cfg.voice.name, e)
                speech = None
        hub = app.attach(engine, model_name=cfg.model.backend, speech=speech)
        watch_backend(app, engine)
        if wy is not None:
            wy.set_voice(speech)
            wy.attach(hub)
        if cfg.mqtt.url:
            from assistant.transport.mqtt import run_mqtt_bridge

            mqtt_task = asyncio.create_task(run_mqtt_bridge(cfg, hub, stop, app.health_checks))  # supervised; /healthz
        print(f"Ready: {base}/", flush=True)
        await stop.wait()
    finally:
        log.info("shutting down")
        await _shutdown(cfg, app, wy)
        if mqtt_task is not None:
            stop.set()
            try:
                await asyncio.wait_for(mqtt_task, cfg.server.shutdown_grace_s + CLOSE_TIMEOUT_S)
            except Exception as e:  # the bridge's failure must not hide a clean server stop
                log.warning("MQTT bridge ended with %r", e)
        if engine.ready:  # a load still running is abandoned with its daemon thread
            await engine.stop()
        if speech is not None:
            speech.close()
    return 0
