"""No host synchronisation in ``observe``, ``observe_measurement``, ``proportions`` or a round's update.

On the CPU a :class:`TorchDispatchMode` fails on every op that reads a device value on the host:
``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``), ``aten.equal``,
``aten.is_nonzero``, and a copy to the CPU from another device (``_to_copy`` / ``copy_``). The mixers
run on the CPU (values checked) and on the ``meta`` device, where a host read cannot succeed at all and a
``.tolist()`` / ``.cpu()`` is a real meta -> cpu copy that the mode sees. ``host_proportions`` is the
one allowed read and is called outside the mode. On a GPU, ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aioli_fast.mixing import build_mixer

D3 = ["a", "b", "c"]
AIOLI = dict(
    sweeps=2,
    block_steps=2,
    one_hot_factor=0.5,
    round_steps=16,
    eta=1.0,
    learn_fraction=1.0,
    prior_steps=0,
    max_learn_share=1.0,
)
SCALAR_READS = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero"}


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raise on host reads of device values; count every op (``counts``) for the assertions."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        self.counts[name] += 1
        if name in SCALAR_READS:
            raise HostSyncError(f"host read: {func}")
        if name == "aten._to_copy":
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu":
                raise HostSyncError(f"device-to-host copy: {func} from {args[0].device}")
        if name == "aten.copy_":
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.device.type != "cpu":
                raise HostSyncError(f"device-to-host copy: {func} from {src.device}")
        return func(*args, **kwargs)


@pytest.fixture
def files(tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"a": 2.0, "b": 3.0, "c": 1.0}))
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [0.6, 0.0, 0.5]]))
    return {"reference": str(reference), "skills_graph": str(graph)}


def batches(steps, device, seed=0):
    """Per-step (loss sums, counts) made outside the mode; NaN / empty domains included."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        counts = torch.randint(0 if step % 5 == 0 else 1, 50, (3,), generator=gen).float()
        sums = (1 + 3 * torch.rand(3, generator=gen)) * counts
        if step % 7 == 3:
            sums[1] = float("nan")
        out.append((sums.to(device), counts.to(device)))
    return out


def run_under_mode(mixer, steps, device):
    """The loop's calls; every mixer call inside the mode, ``host_proportions`` outside it."""
    data = batches(steps, device)
    mode = NoHostSync()
    returned = []
    for step in range(steps):
        with mode:
            due = mixer.measurement_due(step)
            if due:
                mixer.observe_measurement(step, *data[step])
            p = mixer.proportions(step)
            if getattr(mixer, "needs_gradients", False) and mixer.alignment_due(step):
                mixer.observe_alignment(step, data[step][0] / 100)
            for _ in range(2):  # two micro-batches
                mixer.observe(step, *data[step])
            mixer.metrics()
        if not returned or p is not returned[-1]:
            returned.append(p)
            if device != "meta":
                mixer.host_proportions(step)  # the allowed read, once per new tensor
    return mode, returned


CASES = {
    "aioli-probe-ema": ("aioli", dict(AIOLI, measurement="probe")),
    "aioli-full_val-cumulative": ("aioli", dict(AIOLI, measurement="full_val", update="cumulative")),
    "aioli-train-ema": ("aioli", dict(AIOLI, measurement="train", measure_steps=2)),
    "aioli-train-diagonal-floor": (
        "aioli",
        dict(AIOLI, measurement="train", diagonal=True, min_proportion=0.05),
    ),
    "aioli-restricted": ("aioli", dict(AIOLI, measurement="probe", prior_steps=3, update="cumulative")),
    "aioli-partial": ("aioli", dict(AIOLI, measurement="probe", learn_fraction=0.25, block_order="mirrored")),
    # the default: the trend fit of every micro-batch and the gated update, rounds starting at 24, 36, 48
    # (the fit starts at step 12: a round before the first update)
    "aioli-round": ("aioli", dict(round_steps=12, prior_steps=24)),
    "odm": ("odm", dict(update_every=2)),
    "doremi-json": ("doremi", dict(update_every=2, min_proportion=0.01)),
    "skillit-train": ("skillit", dict(update_every=2)),
    "skillit-probe": ("skillit", dict(update_every=3, measurement="probe")),
    "doge": ("doge", dict(update_every=2)),
}


def build(case, files, device):
    method, options = CASES[case]
    if method == "doremi":
        options = {**options, "reference": files["reference"]}
    if method == "skillit":
        options = {**options, "skills_graph": files["skills_graph"]}
    return build_mixer(method, D3, device=device, **options)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_host_read_in_observe_and_updates(case, device, files):
    mixer = build(case, files, device)
    steps = 3 * 16 + 3 if mixer.name == "aioli" else 24
    mode, returned = run_under_mode(mixer, steps, device)
    assert sum(mode.counts[name] for name in SCALAR_READS) == 0
    # the mode saw the real work: the updates ran inside it (on the mixer's device)
    assert mode.counts["aten._softmax"] + mode.counts["aten.logsumexp"] > 0
    if mixer.name == "aioli":
        assert mixer.state_dict()["round_done"] == 2
        assert (
            mode.counts["aten.mm"] >= 3 or mixer.diagonal or mixer.measurement == "round"
        )  # a solve a round
    else:
        assert mixer.num_updates > 3
    assert all(p.device.type == device for p in returned)
    if device == "cpu":
        assert len(returned) > 3 and all(torch.isfinite(p).all() for p in returned)


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.sum() > 0),
        lambda t: int(t.argmax()),
        lambda t: torch.equal(t, t),
        lambda t: t.max().is_nonzero(),
    ],
    ids=["item", "bool", "int", "equal", "is_nonzero"],
)
def test_the_mode_catches_scalar_reads(read):
    with NoHostSync(), pytest.raises(HostSyncError, match="host read"):
        read(torch.ones(3))


@pytest.mark.parametrize(
    "copy",
    [lambda t: t.cpu(), lambda t: t.to("cpu"), lambda t: t.tolist(), lambda t: torch.empty(3).copy_(t)],
    ids=["cpu", "to-cpu", "tolist", "copy_"],
)
def test_the_mode_catches_device_to_host_copies(copy):
    with NoHostSync(), pytest.raises(HostSyncError, match="device-to-host copy"):
        copy(torch.ones(3, device="meta"))


def test_host_proportions_is_the_read_the_mode_would_catch(files):
    mixer = build("aioli-probe-ema", files, "meta")
    exploit = AIOLI["sweeps"] * 3 * AIOLI["block_steps"]  # first exploit step of round 0
    with NoHostSync(), pytest.raises(HostSyncError, match="device-to-host copy"):
        mixer.host_proportions(exploit)
    # within LearnParams the host knows the mixture: no read at all
    with NoHostSync() as mode:  # (drawing the round's order on the host CPU generator is fine)
        assert mixer.host_proportions(0) == pytest.approx(mixer.host_values(0))
    assert not {"aten._to_copy", "aten.copy_", *SCALAR_READS} & set(mode.counts)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_no_cuda_sync_in_observe_and_updates(case, files):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    mixer = build(case, files, "cuda")
    steps = 3 * 16 + 3 if mixer.name == "aioli" else 24
    data = batches(steps, "cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(steps):
            if mixer.measurement_due(step):
                mixer.observe_measurement(step, *data[step])
            p = mixer.proportions(step)
            if getattr(mixer, "needs_gradients", False) and mixer.alignment_due(step):
                mixer.observe_alignment(step, data[step][0] / 100)
            mixer.observe(step, *data[step])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert p.is_cuda and torch.isfinite(p).all()
    if mixer.name == "aioli":
        assert mixer.state_dict()["round_done"] == 2
    else:
        assert mixer.num_updates > 3
