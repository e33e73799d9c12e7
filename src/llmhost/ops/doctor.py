"""`llmhost doctor`: the guide's host checks (OS, kernel, Python and packages, NVIDIA driver and
CUDA, GPUs, NCCL and GPU links, disk space and read speed, RAM reserve, swap and zswap,
SELinux, the service port), each pass, warn or fail with a reason and a fix."""

from __future__ import annotations

import ctypes.util
import platform
import re
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Literal

import psutil

from llmhost.config import Settings
from llmhost.observability.gpu import Nvml
from llmhost.ops.diskspeed import sequential_read

Status = Literal["pass", "warn", "fail"]
MIN_DRIVER = (525, 85, 12)
MIN_KERNEL = (5, 4)
MIN_READ_MBS = 500.0
RAM_RESERVE = 0.2
GIB = 1 << 30


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    reason: str
    fix: str = ""


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _pkg(name: str) -> str | None:
    try:
        return pkg_version(name)
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class LlamaBuild:
    """An installed llama-cpp-python: its version and what its llama.cpp was built to use
    (`llama_print_system_info()`: `CPU : AVX = 1 | AVX2 = 1 | ...`)."""

    version: str
    system_info: str


def installed_llama_build() -> LlamaBuild | None:
    """The llama-cpp-python of this environment, None when it is not installed; raises what
    importing it raises (a build for another CPU can fail to load at all)."""
    v = _pkg("llama-cpp-python")
    if v is None:
        return None
    import llama_cpp

    return LlamaBuild(v, llama_cpp.llama_print_system_info().decode(errors="replace"))


class Doctor:
    """Runs every check; `nvml`, `root` (the host's files) and `llama_build` (what the
    installed llama.cpp was built with) can be swapped for tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        nvml: Nvml | None = None,
        io_bytes: int = 256 << 20,
        root: Path = Path("/"),
        llama_build: Callable[[], LlamaBuild | None] = installed_llama_build,
    ):
        self.settings = settings
        self.nvml = nvml or Nvml()
        self.io_bytes = io_bytes
        self.root = root
        self.llama_build = llama_build

    def _read(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text()
        except OSError:
            return None

    # --- system ----------------------------------------------------------------------------

    def os_release(self) -> Check:
        text = self._read("etc/os-release") or ""
        info = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', text, re.M))
        name = info.get("PRETTY_NAME") or platform.platform()
        ident, ver = info.get("ID", ""), _version_tuple(info.get("VERSION_ID", ""))
        supported = {
            "ubuntu": (20, 4),
            "debian": (11,),
            "rhel": (8,),
            "centos": (8,),
            "rocky": (8,),
            "almalinux": (8,),
        }
        if ident in supported and ver and ver >= supported[ident]:
            return Check("os", "pass", name)
        return Check(
            "os",
            "warn",
            f"{name}: not a tested distribution",
            "Ubuntu 20.04+/22.04, Debian 11+ or RHEL/Rocky 8+ are tested",
        )

    def kernel(self) -> Check:
        rel = platform.release()
        if _version_tuple(rel)[:2] >= MIN_KERNEL:
            return Check("kernel", "pass", f"Linux {rel}")
        return Check(
            "kernel",
            "fail",
            f"Linux {rel} is older than 5.4",
            "upgrade the kernel (NVIDIA's CUDA drivers need >= 5.4)",
        )

    def python(self) -> Check:
        return Check("python", "pass", f"Python {sys.version.split()[0]} ({sys.executable})")

    def packages(self) -> list[Check]:
        out = []
        tf = _pkg("transformers")
        if tf is None:
            out.append(
                Check(
                    "transformers",
                    "warn",
                    "not installed (only the llama.cpp engine)",
                    "pip install 'llmhost[transformers]'",
                )
            )
        elif _version_tuple(tf) < (4, 56):
            out.append(
                Check(
                    "transformers",
                    "fail",
                    f"{tf} < 4.56 (the guide asks for >= 4.30; llmhost's transformers engine "
                    "needs the per-layer KV cache of 4.56)",
                    "pip install -U 'transformers>=4.56'",
                )
            )
        else:
            out.append(Check("transformers", "pass", tf))
        tok = _pkg("tokenizers")
        out.append(
            Check("tokenizers", "pass", tok)
            if tok
            else Check("tokenizers", "fail", "not installed", "pip install tokenizers")
        )
        out.append(self.torch())
        out.append(self.llama_cpp())
        return out

    def torch(self) -> Check:
        tv = _pkg("torch")
        if tv is None:
            return Check(
                "torch",
                "warn",
                "not installed (only the llama.cpp engine)",
                "pip install 'llmhost[transformers]'",
            )
        cuda_driver = self.nvml.cuda_driver_version()
        if cuda_driver is None:
            kind = "CPU build" if "+cpu" in tv else "build"
            return Check("torch", "pass", f"{tv} ({kind}; no NVIDIA driver to match)")
        import torch  # only with a GPU: importing takes seconds

        built = torch.version.cuda
        if built is None:
            return Check(
                "torch",
                "warn",
                f"{tv} is a CPU build on a host with CUDA {cuda_driver}",
                "install a CUDA build of torch matching the driver",
            )
        if _version_tuple(built)[:2] > _version_tuple(cuda_driver)[:2]:
            return Check(
                "torch",
                "fail",
                f"torch {tv} needs CUDA {built}, the driver supports {cuda_driver}",
                "upgrade the NVIDIA driver or install torch built for an older CUDA",
            )
        return Check("torch", "pass", f"{tv} (CUDA {built}, driver supports {cuda_driver})")

    def llama_cpp(self) -> Check:
        try:
            build = self.llama_build()
        except Exception as exc:  # a build for the wrong CPU can fail to load at all
            return Check(
                "llama-cpp-python",
                "fail",
                f"{_pkg('llama-cpp-python')} does not load: {exc}",
                "rebuild: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON ...' pip install "
                "--force-reinstall --no-cache-dir --no-binary llama-cpp-python llama-cpp-python",
            )
        if build is None:
            return Check(
                "llama-cpp-python",
                "warn",
                "not installed",
                "./scripts/install.sh (builds it with portable CPU flags)",
            )
        v, info = build.version, build.system_info
        used = {k.lower() for k, val in re.findall(r"(\w+) = (\d)", info) if val == "1"}
        flags = set((self._read("proc/cpuinfo") or "").split())
        cpu_needs = {
            "avx": "avx",
            "avx2": "avx2",
            "fma": "fma",
            "f16c": "f16c",
            "avx512": "avx512f",
            "avx512_vnni": "avx512_vnni",
            "amx_int8": "amx_int8",
        }
        missing = sorted(f for f in used if f in cpu_needs and cpu_needs[f] not in flags)
        if missing and flags:
            return Check(
                "llama-cpp-python",
                "fail",
                f"{v} uses {', '.join(missing)}, which this CPU lacks (SIGILL at decode)",
                "rebuild: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
                "-DGGML_F16C=ON' ./scripts/install.sh (it rebuilds when the flags change)",
            )
        feats = ", ".join(sorted(used & set(cpu_needs))) or "baseline x86-64"
        return Check("llama-cpp-python", "pass", f"{v} ({feats})")

    # --- GPUs ------------------------------------------------------------------------------

    def gpus(self) -> list[Check]:
        driver = self.nvml.driver_version()
        if driver is None:
            why = self.nvml.unavailable or "no NVIDIA driver"
            return [
                Check(
                    "nvidia-driver",
                    "warn",
                    f"no NVIDIA GPU usable: {why}; CPU serving only",
                    "install NVIDIA driver >= 525.85.12 on GPU hosts (nvidia-smi must work)",
                )
            ]
        out = []
        if _version_tuple(driver) < MIN_DRIVER:
            out.append(
                Check("nvidia-driver", "fail", f"{driver} < 525.85.12", "upgrade the NVIDIA driver")
            )
        else:
            out.append(Check("nvidia-driver", "pass", driver))
        cuda = self.nvml.cuda_driver_version()
        out.append(
            Check("cuda", "pass", f"driver supports CUDA {cuda}")
            if cuda
            else Check("cuda", "warn", "CUDA version unknown", "check nvidia-smi")
        )
        gpus = self.nvml.readings()
        if not gpus:
            out.append(Check("gpus", "warn", "the driver sees no GPU", "check nvidia-smi"))
            return out
        listing = "; ".join(
            f"{g.index}: {g.name} {((g.memory_total or 0) / GIB):.0f} GiB" for g in gpus
        )
        out.append(Check("gpus", "pass", listing))
        if len(gpus) > 1:
            nccl = ctypes.util.find_library("nccl") or any(
                _pkg(p) for p in ("nvidia-nccl-cu12", "nvidia-nccl-cu11", "nvidia-nccl-cu13")
            )
            out.append(
                Check("nccl", "pass", "found")
                if nccl
                else Check(
                    "nccl",
                    "warn",
                    "NCCL not found: multi-GPU communication will be slow or fail",
                    "apt-get install libnccl2, or pip install nvidia-nccl-cu12",
                )
            )
            links = self.nvml.links()
            pcie = [pair for pair, kind in links.items() if kind != "NVLink"]
            if pcie:
                out.append(
                    Check(
                        "gpu-links",
                        "warn",
                        f"GPUs {', '.join(f'{a}-{b}' for a, b in pcie)} talk over PCIe",
                        "tensor parallelism prefers NVLink; use pipeline parallelism "
                        "across PCIe-only pairs",
                    )
                )
            else:
                out.append(Check("gpu-links", "pass", "all GPU pairs linked by NVLink"))
        return out

    # --- storage and memory ----------------------------------------------------------------

    def disk(self) -> list[Check]:
        folder = self.settings.models_dir
        probe = (
            folder
            if folder.exists()
            else next((p for p in folder.parents if p.exists()), Path("/"))
        )
        free = shutil.disk_usage(probe).free
        models = (
            sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            if (folder.exists())
            else 0
        )
        status: Status = "pass" if free >= 50 * GIB else ("warn" if free >= 5 * GIB else "fail")
        out = [
            Check(
                "disk-free",
                status,
                f"{free / GIB:.0f} GiB free for {folder} (models there: {models / GIB:.1f} GiB)",
                "" if status == "pass" else "a 13B model's files take ~26-35 GB; free space",
            )
        ]
        out.append(self.read_speed(probe))
        return out

    def read_speed(self, folder: Path) -> Check:
        """Sequential read of a fresh test file, O_DIRECT where the filesystem allows it, so
        the page cache does not flatter the disk."""
        size = self.io_bytes
        if shutil.disk_usage(folder).free < size * 2:
            return Check("disk-read", "warn", "not enough free space to measure", "")
        try:
            mbs, direct = sequential_read(folder, size)
        except OSError as exc:
            return Check("disk-read", "warn", f"could not measure in {folder}: {exc}", "")
        how = "O_DIRECT" if direct else "page cache dropped"
        if mbs >= MIN_READ_MBS:
            return Check("disk-read", "pass", f"{mbs:.0f} MB/s sequential read ({how})")
        return Check(
            "disk-read",
            "warn",
            f"{mbs:.0f} MB/s sequential read ({how}) < 500 MB/s",
            "keep models on SSD/NVMe (the guide: RAID0 of SSDs) so loads do not stall",
        )

    def memory(self) -> list[Check]:
        vm, sw = psutil.virtual_memory(), psutil.swap_memory()
        out = []
        share = vm.available / vm.total
        if share >= RAM_RESERVE:
            out.append(
                Check(
                    "ram",
                    "pass",
                    f"{vm.total / GIB:.0f} GiB, {share:.0%} available (guide: keep 20% in reserve)",
                )
            )
        else:
            out.append(
                Check(
                    "ram",
                    "warn",
                    f"only {share:.0%} of {vm.total / GIB:.0f} GiB is "
                    "available; the guide keeps 20% free for caches and scheduling",
                    "serve a smaller model or quantization, or add RAM",
                )
            )
        want = vm.total / 2  # the guide: 32 GB of swap on a 64 GB host
        if sw.total >= want * 0.9:
            out.append(Check("swap", "pass", f"{sw.total / GIB:.0f} GiB"))
        else:
            out.append(
                Check(
                    "swap",
                    "warn",
                    f"{sw.total / GIB:.0f} GiB; the guide sizes swap at half of RAM "
                    f"({want / GIB:.0f} GiB here)",
                    f"fallocate -l {want / GIB:.0f}G /swapfile && chmod 600 /swapfile && "
                    "mkswap /swapfile && swapon /swapfile",
                )
            )
        z = self._read("sys/module/zswap/parameters/enabled")
        if z is None:
            out.append(
                Check(
                    "zswap",
                    "warn",
                    "zswap is not available in this kernel",
                    "a kernel with zswap gains 15-20% usable memory (guide)",
                )
            )
        elif z.strip() in ("Y", "1"):
            out.append(Check("zswap", "pass", "enabled"))
        else:
            out.append(
                Check("zswap", "warn", "disabled", "echo Y > /sys/module/zswap/parameters/enabled")
            )
        return out

    def selinux(self) -> Check:
        enforce = self._read("sys/fs/selinux/enforce")
        if enforce is None:
            return Check("selinux", "pass", "not active")
        if enforce.strip() == "1":
            return Check(
                "selinux",
                "warn",
                "enforcing",
                "the guide disables SELinux (setenforce 0; SELINUX=permissive in "
                "/etc/selinux/config), or write a policy for llmhost",
            )
        return Check("selinux", "pass", "permissive")

    def port(self) -> Check:
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return Check("port", "pass", f"{host}:{port} is free")
            except OSError as exc:
                bind_error = exc.strerror
        import httpx

        try:
            r = httpx.get(
                f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/health", timeout=2
            )
            if r.status_code == 200 and r.json().get("status") == "ok":
                return Check("port", "pass", f"{host}:{port} answers: llmhost is serving")
        except (httpx.HTTPError, ValueError):
            pass
        return Check(
            "port",
            "fail",
            f"{host}:{port}: {bind_error}",
            "stop what holds the port (ss -ltnp) or choose --port",
        )

    def run(self) -> list[Check]:
        steps: list[Callable[[], Check | list[Check]]] = [
            self.os_release,
            self.kernel,
            self.python,
            self.packages,
            self.gpus,
            self.disk,
            self.memory,
            self.selinux,
            self.port,
        ]
        out: list[Check] = []
        for step in steps:
            try:
                got = step()
            except Exception as exc:  # one broken probe must not hide the other checks
                got = Check(step.__name__, "warn", f"check failed: {exc}", "")
            out.extend(got if isinstance(got, list) else [got])
        return out


def exit_code(checks: list[Check]) -> int:
    statuses = {c.status for c in checks}
    return 2 if "fail" in statuses else (1 if "warn" in statuses else 0)


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
