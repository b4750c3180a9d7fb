"""The machine and the versions a record was measured with (also used by ``pplfast doctor``)."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Dict, Optional

import torch

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def driver_version() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(module: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, object]:
    import pplfast

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
        "pplfast": pplfast.__version__,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
    }
    return {"machine": machine, "versions": versions}

