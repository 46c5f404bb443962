"""Run the server: the engine loop on this (the main) thread, uvicorn's event loop on another.

On a quiet machine torch's OpenMP kernels ran fastest from the thread that first used them, the
main thread that loaded the model (docs/performance.md has the measurements), so the engine keeps
it and HTTP moves out. Ctrl-C / SIGTERM stop uvicorn gracefully (open streams finish; a second
Ctrl-C cuts them), uvicorn's shutdown stops the engine loop, and a server that cannot start
(port taken) ends the engine loop too.
"""
from __future__ import annotations

import gc
import logging
import signal
import threading

log = logging.getLogger("minicpmv.server")


def serve(app, host: str, port: int, log_level: str) -> int:
    """Serve `app` (made by create_app(..., engine_thread=False)) until a signal; the exit status."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           log_config=None))
    worker = app.state.server.worker
    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - uvicorn exits with SystemExit when it cannot bind
            failed.append(e)
        finally:
            worker.stop()  # no-op when uvicorn's shutdown already stopped it

    # the model, tokenizer and grammar tables live as long as the process: keep them out of every
    # later garbage collection pass (each pass would walk them between engine steps)
    gc.collect()
    gc.freeze()
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="minicpmv-http")
    engine_ok = False
    try:
        thread.start()
        engine_ok = worker.run_here()
    finally:
        server.should_exit = True
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not engine_ok:  # the loop died (logged); a service manager should restart the server
        return 1
    if failed or not server.started:
        code = getattr(failed[0], "code", 1) if failed else 1
        return code if isinstance(code, int) and code else 1
    return 0
