"""A lost peer is recognised by the type of the error, with two real gloo processes (CPU): the other
process exits, and the survivor's next collective raises :class:`CollectiveError` (gloo itself raises a
plain ``RuntimeError``); an error that is not a collective's keeps its type."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from aioli_fast.distributed import CollectiveError, collectives, is_collective_failure

SURVIVOR = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from aioli_fast.distributed import all_reduce_, any_rank, is_collective_failure

    dist.init_process_group("gloo")
    all_reduce_(torch.ones(3))  # both ranks are up
    if dist.get_rank() == 1:
        os._exit(0)  # a peer that dies without a word
    found = {}
    calls = {"all_reduce_": lambda: all_reduce_(torch.ones(3)), "any_rank": lambda: any_rank(True)}
    for name, call in calls.items():
        try:
            call()
            found[name] = None
        except Exception as exc:
            found[name] = [type(exc).__name__, is_collective_failure(exc), type(exc.__cause__).__name__]
    print(json.dumps(found), flush=True)
    os._exit(0)
    """
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_the_survivor_of_a_lost_peer_gets_a_collective_error(tmp_path):
    script = tmp_path / "survivor.py"
    script.write_text(SURVIVOR, encoding="utf-8")
    port = str(_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank)}
        env.update(WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
        )
    out = [p.communicate(timeout=120)[0] for p in procs]
    found = json.loads(out[0].strip().splitlines()[-1])
    for name in ("all_reduce_", "any_rank"):
        kind, recognised, cause = found[name]
        assert (kind, recognised) == ("CollectiveError", True), found
        assert cause == "RuntimeError"  # gloo's own error, chained


def test_errors_that_are_not_a_collectives_keep_their_type():
    # alone (no process group) nothing is converted: a RuntimeError is not a lost peer
    with pytest.raises(RuntimeError) as info, collectives():
        raise RuntimeError("shape mismatch")
    assert type(info.value) is RuntimeError and not is_collective_failure(info.value)
    with pytest.raises(ValueError), collectives():
        raise ValueError("not a runtime error")
    chained = RuntimeError("outer")
    chained.__cause__ = CollectiveError("connection closed")
    assert is_collective_failure(chained)
    assert not is_collective_failure(torch.OutOfMemoryError("out of memory"))
