"""What this CPU can do for inference, and what an INT8 artifact assumes of the CPU it runs on.

Why it matters: x86 CPUs without VNNI (AVX2-only cores, AVX-512 before Cascade Lake) compute int8
dot products with ``vpmaddubsw``, which adds pairs of u8 x s8 products into a *saturating* 16-bit
sum. Full-range 8-bit weights can overflow it, and an INT8 model then loses accuracy silently.
VNNI (``vpdpbusd``) and AMX accumulate in 32 bits and never saturate. Weights limited to 7 bits
cannot overflow on any of them: that is the portable INT8 form (NNCF ``OverflowFix.ENABLE``).

The CPU is read from ``/proc/cpuinfo`` (Linux), ``sysctl`` (macOS) or ``platform`` elsewhere, and
capped by ``ONEDNN_MAX_CPU_ISA`` when it is set, since OpenVINO's CPU plugin (oneDNN) honours that
cap and then runs the capped kernels.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass

ISA_CAP_VARIABLE = "ONEDNN_MAX_CPU_ISA"
FEATURES = ("avx2", "avx512", "vnni", "amx", "bf16")

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) -> the features a kernel may use under that cap.
_ONEDNN_CAPS = {
    "SSE41": (), "AVX": (), "AVX2": ("avx2",), "AVX2_VNNI": ("avx2", "vnni"),
    "AVX2_VNNI_2": ("avx2", "vnni"), "AVX512_CORE": ("avx2", "avx512"),
    "AVX512_CORE_VNNI": ("avx2", "avx512", "vnni"),
    "AVX512_CORE_BF16": ("avx2", "avx512", "vnni", "bf16"),
    "AVX512_CORE_FP16": ("avx2", "avx512", "vnni", "bf16"),
    "AVX512_CORE_AMX": FEATURES, "AVX512_CORE_AMX_FP16": FEATURES, "AVX10_1_512": FEATURES,
    "AVX10_1_512_AMX": FEATURES, "AVX10_1_512_AMX_FP16": FEATURES, "ALL": FEATURES,
    "DEFAULT": FEATURES,
}

# INT8 target -> True when its int8 dot products accumulate in 32 bits (no 16-bit saturation).
INT8_TARGET_ISAS = {"portable": False, "avx2": False, "avx512": False, "vnni": True, "amx": True}
INT8_TARGET_CHOICES = ("portable", "auto") + tuple(t for t in INT8_TARGET_ISAS if t != "portable")
DEFAULT_INT8_TARGET = "portable"


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False
    amx: bool = False
    bf16: bool = False
    cap: str | None = None  # ONEDNN_MAX_CPU_ISA, when set

    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i386", "i686")

    @property
    def isa(self) -> str:
        """The best int8 level: amx, vnni, avx512, avx2, or the architecture for others."""
        if not self.x86:
            return self.arch
        for feature in ("amx", "vnni", "avx512", "avx2"):
            if getattr(self, feature):
                return feature
        return "sse"

    def describe(self) -> str:
        """One line for headers: 'AMD EPYC (x86_64): AVX2; no AVX-512, VNNI, AMX, bf16'."""
        if not self.x86:
            return f"{self.model} ({self.arch})"
        names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "amx": "AMX", "bf16": "bf16"}
        has = [names[f] for f in FEATURES if getattr(self, f)]
        lacks = [names[f] for f in FEATURES if not getattr(self, f)]
        parts = ([", ".join(has)] if has else []) + ([f"no {', '.join(lacks)}"] if lacks else [])
        capped = f" (capped by {ISA_CAP_VARIABLE}={self.cap})" if self.cap else ""
        return f"{self.model} ({self.arch}): {'; '.join(parts)}{capped}"

    def as_dict(self) -> dict:
        return {**asdict(self), "isa": self.isa, "summary": self.describe()}

    def int8_note(self) -> str | None:
        """Why INT8 and bf16 numbers on this CPU may surprise, or None on VNNI/AMX CPUs."""
        if not self.x86:
            return None
        notes = []
        if not self.vnni:
            notes.append("no VNNI: int8 dot products go through saturating 16-bit sums, so INT8 "
                         "gives little or no speed-up over f32 here, and only INT8 models made "
                         "for this ISA (portable, 7-bit weights) keep their accuracy")
        if not self.bf16:
            notes.append("no native bf16: the bf16 precision hint runs in f32 here")
        return "; ".join(notes) or None


def _linux_cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return model, flags


def _macos_cpuinfo() -> tuple[str, set[str]]:
    def sysctl(name):
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    flags = " ".join((sysctl("machdep.cpu.features"), sysctl("machdep.cpu.leaf7_features")))
    return sysctl("machdep.cpu.brand_string"), set(flags.lower().replace(".", "_").split())


def _features(flags: set[str]) -> dict[str, bool]:
    return {"avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"} & flags),
            "amx": bool({"amx_int8", "amx_tile"} & flags),
            "bf16": bool({"avx512_bf16", "amx_bf16", "avx512bf16"} & flags)}


def _apply_cap(features: dict[str, bool], cap: str | None) -> dict[str, bool]:
    allowed = _ONEDNN_CAPS.get((cap or "").upper())
    if allowed is None:
        return features
    return {name: present and name in allowed for name, present in features.items()}


@functools.lru_cache(maxsize=1)
def host_cpu() -> CpuInfo:
    """This machine's CPU as inference engines see it (cached; the cap is read once)."""
    arch = platform.machine() or "unknown"
    model, flags = "", set()
    try:
        if sys.platform.startswith("linux"):
            model, flags = _linux_cpuinfo()
        elif sys.platform == "darwin":
            model, flags = _macos_cpuinfo()
    except OSError:
        pass
    cap = os.environ.get(ISA_CAP_VARIABLE) or None
    return CpuInfo(model or platform.processor() or "unknown CPU", arch,
                   **_apply_cap(_features(flags), cap), cap=cap)


def resolve_int8_target(target: str | None, cpu: CpuInfo | None = None) -> str:
    """A target of ``INT8_TARGET_CHOICES`` as one of ``INT8_TARGET_ISAS``; ``auto`` is this CPU,
    None the default."""
    target = DEFAULT_INT8_TARGET if target is None else target
    if target not in INT8_TARGET_CHOICES:
        raise ValueError(f"INT8 target CPU ISA must be one of {INT8_TARGET_CHOICES}, "
                         f"got {target!r}")
    if target != "auto":
        return target
    level = (cpu or host_cpu()).isa
    return level if level in INT8_TARGET_ISAS else "portable"


def int8_needs_exact_accumulation(target: str) -> bool:
    """True when an INT8 model made for ``target`` relies on 32-bit int8 accumulation (VNNI/AMX):
    its full-range 8-bit weights may saturate the 16-bit sums of other x86 CPUs."""
    return INT8_TARGET_ISAS[resolve_int8_target(target)]


def int8_mismatch(target: str | None, cpu: CpuInfo | None = None) -> str | None:
    """Why an INT8 model made for ``target`` (None: made before targets were recorded, i.e. with
    NNCF's default, which protects the first layer only) may lose accuracy on ``cpu``, or None."""
    cpu = cpu or host_cpu()
    if not cpu.x86 or cpu.vnni:
        return None
    if target is None:
        return (f"this INT8 model records no target CPU ISA (made by an older version, full-range "
                f"weights): on this CPU ({cpu.describe()}) its int8 sums may saturate and lose "
                f"accuracy; re-export it with the default portable target")
    if not int8_needs_exact_accumulation(target):
        return None
    return (f"this INT8 model was made for {target} CPUs (full-range 8-bit weights, 32-bit int8 "
            f"accumulation) but this CPU has no VNNI ({cpu.describe()}): its int8 sums saturate "
            f"and accuracy drops; export with the portable target (--cpu-isa portable) for CPUs "
            f"like this one")
