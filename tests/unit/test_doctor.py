"""doctor: each check on a made-up host (files under a fake root, a fake NVML), and the real
command on this GPU-less machine."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from llmhost.config import Settings
from llmhost.observability.gpu import Nvml
from llmhost.ops.doctor import Doctor, LlamaBuild, exit_code, installed_llama_build
from tests.unit.test_metrics import FakeNvml


class NvmlHost(FakeNvml):
    def __init__(self, driver="550.54.15", cuda=12040, nvlink=True, **kw):
        super().__init__(**kw)
        self.driver, self.cuda, self.nvlink = driver, cuda, nvlink

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        return 0 if self.nvlink else 4


def host(
    tmp_path,
    os_release='ID=ubuntu\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04"\n',
    selinux=None,
    zswap="Y\n",
    cpuinfo="flags : fpu avx avx2 fma f16c\n",
):
    root = tmp_path / "root"
    for rel, text in (
        ("etc/os-release", os_release),
        ("sys/fs/selinux/enforce", selinux),
        ("sys/module/zswap/parameters/enabled", zswap),
        ("proc/cpuinfo", cpuinfo),
    ):
        if text is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
    return root


def by_name(checks):
    return {c.name: c for c in checks}


PORTABLE = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
AVX512 = PORTABLE + "AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 0 | "


def doctor(tmp_path, nvml=None, llama: str | None = PORTABLE, **kw):
    """A Doctor on a made-up host whose llama-cpp-python reports `llama` as its system info
    (None: not installed), whatever this machine's own build is."""
    settings = Settings(home=tmp_path / "home", port=free_port())
    build = None if llama is None else LlamaBuild("0.3.16", llama)
    return Doctor(
        settings,
        nvml=Nvml(nvml or NvmlHost()),
        io_bytes=16 << 20,
        root=host(tmp_path, **kw),
        llama_build=lambda: build,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_os_selinux_zswap_from_the_host_files(tmp_path):
    d = doctor(tmp_path)
    assert d.os_release().status == "pass"
    assert d.selinux().status == "pass"
    zswap = by_name(d.memory())["zswap"]
    assert zswap.status == "pass"
    d = doctor(
        tmp_path / "b", os_release='ID=arch\nPRETTY_NAME="Arch"\n', selinux="1\n", zswap="N\n"
    )
    assert d.os_release().status == "warn"
    assert d.selinux().status == "warn" and "setenforce" in d.selinux().fix
    assert by_name(d.memory())["zswap"].status == "warn"
    d = doctor(tmp_path / "c", os_release='ID=ubuntu\nVERSION_ID="18.04"\n', selinux="0\n")
    assert d.os_release().status == "warn" and d.selinux().status == "pass"


def test_gpus_driver_cuda_links(tmp_path):
    checks = by_name(doctor(tmp_path).gpus())
    assert checks["nvidia-driver"].status == "pass"
    assert checks["cuda"].reason == "driver supports CUDA 12.4"
    assert "A100" in checks["gpus"].reason and "80 GiB" in checks["gpus"].reason
    assert checks["gpu-links"].status == "pass"
    assert checks["nccl"].status in ("pass", "warn")
    checks = by_name(doctor(tmp_path / "b", NvmlHost(driver="470.57.02", nvlink=False)).gpus())
    assert (
        checks["nvidia-driver"].status == "fail" and "525.85.12" in checks["nvidia-driver"].reason
    )
    assert checks["gpu-links"].status == "warn" and "0-1" in checks["gpu-links"].reason


def test_no_gpu_is_a_warning_with_a_reason(tmp_path):
    checks = doctor(tmp_path, NvmlHost(fail_init=True)).gpus()
    assert [c.status for c in checks] == ["warn"]
    assert "Driver Not Loaded" in checks[0].reason and "CPU" in checks[0].reason


def test_llama_cpp_build_against_cpu_flags(tmp_path):
    c = doctor(tmp_path).llama_cpp()
    assert c.status == "pass" and c.reason == "0.3.16 (avx, avx2, f16c, fma)"
    # a CPU without AVX2 cannot run a build that uses it
    c = doctor(tmp_path / "b", cpuinfo="flags : fpu sse4_2\n").llama_cpp()
    assert c.status == "fail" and "avx, avx2, f16c, fma" in c.reason and "GGML_NATIVE=OFF" in c.fix
    # the case a cached AVX-512 wheel made: a build using AVX-512 on a CPU without it
    c = doctor(tmp_path / "c", llama=AVX512).llama_cpp()
    assert c.status == "fail" and "avx512, avx512_vnni" in c.reason, c.reason
    cpuinfo = "flags : fpu avx avx2 fma f16c avx512f avx512_vnni\n"
    assert doctor(tmp_path / "d", llama=AVX512, cpuinfo=cpuinfo).llama_cpp().status == "pass"
    assert doctor(tmp_path / "e", llama=None).llama_cpp().status == "warn"


def test_llama_cpp_that_does_not_load_is_a_failure(tmp_path):
    def broken():
        raise OSError("libllama.so: undefined symbol")

    d = doctor(tmp_path)
    d.llama_build = broken
    c = d.llama_cpp()
    assert c.status == "fail" and "undefined symbol" in c.reason and "--no-binary" in c.fix


def test_the_real_build_is_described(tmp_path):
    """This machine's llama-cpp-python, if any, only as far as the description goes."""
    build = installed_llama_build()
    if build is not None:
        assert build.version and "CPU" in build.system_info


def test_port_and_disk(tmp_path):
    d = doctor(tmp_path)
    assert d.port().status == "pass"
    with socket.socket() as s:
        s.bind(("127.0.0.1", d.settings.port))
        s.listen()
        busy = d.port()
    assert busy.status == "fail" and "--port" in busy.fix
    read = d.read_speed(tmp_path)
    assert read.status in ("pass", "warn") and "MB/s" in read.reason
    assert not list(tmp_path.glob(".llmhost-doctor-*"))  # the test file is removed
    assert by_name(d.disk())["disk-free"].reason.startswith(tuple("0123456789"))


def test_exit_codes(tmp_path):
    from llmhost.ops.doctor import Check

    assert exit_code([Check("a", "pass", "")]) == 0
    assert exit_code([Check("a", "pass", ""), Check("b", "warn", "")]) == 1
    assert exit_code([Check("a", "fail", ""), Check("b", "warn", "")]) == 2


def test_cli_on_this_machine(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmhost",
            "doctor",
            "--json",
            "--io-mb",
            "32",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(p.stdout)
    assert p.returncode == out["exit_code"] == exit_code_of(out["checks"])
    names = {c["name"]: c for c in out["checks"]}
    for name in (
        "os",
        "kernel",
        "python",
        "nvidia-driver",
        "disk-free",
        "disk-read",
        "ram",
        "swap",
        "zswap",
        "selinux",
        "port",
    ):
        assert name in names, name
    if names["nvidia-driver"]["status"] != "pass":  # this GPU-less machine
        assert names["nvidia-driver"]["status"] == "warn" and names["nvidia-driver"]["reason"]
    for c in out["checks"]:
        assert c["status"] in ("pass", "warn", "fail") and c["reason"]


def exit_code_of(checks):
    s = {c["status"] for c in checks}
    return 2 if "fail" in s else 1 if "warn" in s else 0
