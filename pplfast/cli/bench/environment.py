"""The machine and the versions a record was measured with (the machine helpers are the CLI's,
shared with ``pplfast doctor``)."""
from __future__ import annotations

import os
import platform
from typing import Dict

import torch

from ..._version import __version__
from .._common import cpu_model, driver_version, mem_total_gib, package_version


def environment(device: torch.device) -> Dict[str, object]:
    machine = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_total_gib(),
        "os": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_memory_gib=props.total_memory / (1 << 30),
                       driver=driver_version(), cuda_runtime=torch.version.cuda)
    versions = {
        "pplfast": __version__,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
    }
    return {"machine": machine, "versions": versions}

