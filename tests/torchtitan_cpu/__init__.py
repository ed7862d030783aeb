"""Running the real torchtitan 0.3 ``Trainer`` on a CPU, for the adapter's tests.

torchtitan targets CUDA; on a machine without an accelerator it stops before training in places that
have nothing to do with the adapter. :func:`allow_cpu` works around exactly those, before torchtitan is
imported, and nothing else (each line names what it is for):

- ``torchtitan/tools/utils.py`` falls back to the device type ``"cuda"`` when no accelerator is found;
- its memory monitor and barrier call ``torch.cpu`` functions that exist only on accelerator modules
  (``get_device_name``, ``get_device_properties``, ``reset_peak_memory_stats``, ``empty_cache``,
  ``memory_stats``, ``current_device``);
- ``torchtitan/distributed/utils.py`` calls ``torch.distributed.set_timeout``, which torch 2.13 lacks
  (its private ``_set_pg_timeout`` does the same);
- FSDP on gloo: torchtitan sets a gradient divide factor of 1, which FSDP turns into a PREMUL_SUM
  reduction that gloo does not have; forcing a plain SUM is the same arithmetic for a factor of 1.

The model, data loader, loss, optimizer, FSDP, checkpointing (DCP) and the training loop are
torchtitan's own. FlexAttention has no backward on the CPU: the tests build the debug model with SDPA.
"""

from __future__ import annotations

import types


def allow_cpu() -> None:
    import torch
    import torch._utils
    import torch.distributed as dist

    torch._utils._get_available_device_type = lambda: "cpu"
    cpu = torch.cpu
    cpu.get_device_name = lambda *a, **k: "cpu"
    cpu.get_device_properties = lambda *a, **k: types.SimpleNamespace(total_memory=64 * 2**30, name="cpu")
    cpu.reset_peak_memory_stats = lambda *a, **k: None
    cpu.empty_cache = lambda *a, **k: None
    cpu.memory_stats = lambda *a, **k: {}
    cpu.current_device = lambda: 0
    if not hasattr(dist, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout

        dist.set_timeout = _set_pg_timeout
    from torch.distributed.fsdp import FSDPModule

    divide = FSDPModule.set_gradient_divide_factor

    def set_gradient_divide_factor(self, factor):
        divide(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor
