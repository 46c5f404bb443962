"""cpu/openmp.py: a confined helper thread runs torch on itself alone (no OpenMP team of its own,
which would make libgomp sleep between the engine's parallel regions), and the server's prepare
threads are confined."""
import os
import threading

import pytest
import torch

from minicpmv.cpu import openmp


def os_threads() -> set:
    """The process's threads by id: a count could miss a thread started while another (a worker of
    a team an earlier test's thread left behind) was ending."""
    return set(os.listdir("/proc/self/task"))


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()))
    t.start()
    t.join()
    return out["value"]


def test_a_confined_thread_forms_no_team_and_leaves_the_process_count(two_threads):
    if openmp.libgomp() is None:  # not torch's libgomp (macOS, Windows): nothing to confine, says so
        assert in_thread(openmp.confine_thread) is False
        return
    x = torch.randn(1 << 22)

    def confined_work():
        ok = openmp.confine_thread()
        n = torch.get_num_threads()
        before = os_threads()
        (x * 2).sum()  # large enough to run in parallel on an unconfined thread
        return ok, n, len(os_threads() - before)

    assert in_thread(confined_work) == (True, 1, 0)
    assert torch.get_num_threads() == 2  # the caller (the engine's thread) keeps its count

    def unconfined_work():  # the check can fail: an unconfined thread does start a worker
        before = os_threads()
        (x * 2).sum()
        return torch.get_num_threads(), len(os_threads() - before)

    assert in_thread(unconfined_work) == (2, 1)


def test_the_server_prepare_threads_are_confined(tiny46_dir, two_threads):
    import minicpmv
    from minicpmv.server.app import create_app
    from minicpmv.server.config import ServeConfig

    app = create_app(minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False), ServeConfig(["tiny"]),
                     engine_thread=False)
    pool = app.state.server.pool
    try:
        counts = {pool.submit(torch.get_num_threads).result() for _ in range(4)}
    finally:
        pool.shutdown()
    assert counts == ({1} if openmp.libgomp() is not None else {2})
