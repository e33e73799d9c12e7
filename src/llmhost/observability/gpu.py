"""NVIDIA GPU readings through NVML (nvidia-ml-py), as the guide's nvidia-smi exporter gives
them: utilisation, memory, temperature and power per GPU. A host without a GPU, driver or
NVML library is a normal state, reported as zero GPUs, never as an error."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("llmhost.gpu")


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    utilization: float | None  # 0..1
    memory_used: int | None  # bytes
    memory_total: int | None
    temperature: float | None  # degrees Celsius
    power: float | None  # watts


def _load_nvml():
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    return pynvml


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


class Nvml:
    """Initialises NVML once, on first use; what failed is kept in `unavailable`."""

    def __init__(self, module=None):
        self._module = module
        self._lock = threading.Lock()
        self._ready: bool | None = None
        self.unavailable = ""

    def _init(self) -> bool:
        with self._lock:
            if self._ready is None:
                nv = self._module if self._module is not None else _load_nvml()
                self._module = nv
                if nv is None:
                    self.unavailable = "nvidia-ml-py is not installed"
                    self._ready = False
                else:
                    try:
                        nv.nvmlInit()
                        self._ready = True
                    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                        self.unavailable = f"NVML unavailable: {exc}"
                        self._ready = False
                        log.debug("no GPU metrics: %s", self.unavailable)
            return self._ready

    def _get(self, fn, *args):
        """One reading; None where this GPU or driver does not support it."""
        try:
            return getattr(self._module, fn)(*args)
        except Exception:
            return None

    def driver_version(self) -> str | None:
        if not self._init():
            return None
        v = self._get("nvmlSystemGetDriverVersion")
        return None if v is None else _text(v)

    def cuda_driver_version(self) -> str | None:
        """The newest CUDA the driver supports, e.g. "12.2"."""
        if not self._init():
            return None
        v = self._get("nvmlSystemGetCudaDriverVersion")
        return None if not v else f"{v // 1000}.{v % 1000 // 10}"

    def links(self) -> dict[tuple[int, int], str]:
        """How each pair of GPUs talks: "NVLink" or "PCIe"."""
        if not self._init():
            return {}
        nv = self._module
        count = self._get("nvmlDeviceGetCount") or 0
        handles = [self._get("nvmlDeviceGetHandleByIndex", i) for i in range(count)]
        index = getattr(nv, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
        ok = getattr(nv, "NVML_P2P_STATUS_OK", 0)
        out = {}
        for i in range(count):
            for j in range(i + 1, count):
                status = self._get("nvmlDeviceGetP2PStatus", handles[i], handles[j], index)
                out[(i, j)] = "NVLink" if status == ok else "PCIe"
        return out

    def readings(self) -> list[GpuReading]:
        if not self._init():
            return []
        nv = self._module
        count = self._get("nvmlDeviceGetCount") or 0
        out = []
        for i in range(count):
            h = self._get("nvmlDeviceGetHandleByIndex", i)
            if h is None:
                continue
            util = self._get("nvmlDeviceGetUtilizationRates", h)
            mem = self._get("nvmlDeviceGetMemoryInfo", h)
            power_mw = self._get("nvmlDeviceGetPowerUsage", h)
            temp = self._get("nvmlDeviceGetTemperature", h, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
            out.append(
                GpuReading(
                    index=i,
                    name=_text(self._get("nvmlDeviceGetName", h) or f"GPU {i}"),
                    uuid=_text(self._get("nvmlDeviceGetUUID", h) or ""),
                    utilization=None if util is None else util.gpu / 100.0,
                    memory_used=None if mem is None else int(mem.used),
                    memory_total=None if mem is None else int(mem.total),
                    temperature=None if temp is None else float(temp),
                    power=None if power_mw is None else power_mw / 1000.0,
                )
            )
        return out


_FIELDS = (
    ("llmhost_gpu_utilization_ratio", "utilization", "GPU busy share over the last sample."),
    ("llmhost_gpu_memory_used_bytes", "memory_used", "GPU memory in use."),
    ("llmhost_gpu_memory_total_bytes", "memory_total", "GPU memory in all."),
    ("llmhost_gpu_temperature_celsius", "temperature", "GPU core temperature."),
    ("llmhost_gpu_power_watts", "power", "GPU power draw."),
)


class GpuCollector(Collector):
    """`llmhost_gpu_count` always; the per-GPU gauges (labels gpu, name, uuid) only for GPUs
    that NVML reports, and each only where the GPU supports that reading."""

    def __init__(self, nvml_module=None):
        self.nvml = nvml_module if isinstance(nvml_module, Nvml) else Nvml(nvml_module)

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("llmhost_gpu_count", "NVIDIA GPUs visible through NVML.")]

    def collect(self) -> Iterable[Metric]:
        gpus = self.nvml.readings()
        yield GaugeMetricFamily(
            "llmhost_gpu_count", "NVIDIA GPUs visible through NVML.", value=len(gpus)
        )
        for name, field, doc in _FIELDS:
            fam = GaugeMetricFamily(name, doc, labels=["gpu", "name", "uuid"])
            for g in gpus:
                v = getattr(g, field)
                if v is not None:
                    fam.add_metric([str(g.index), g.name, g.uuid], v)
            if fam.samples:
                yield fam
