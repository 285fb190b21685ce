"""The wheels carried to the GPU machine: the pinned list (``wheels.txt``) and a check of a wheel folder.

Design decisions:
- ``wheels.txt`` is the one list: ``fetch_wheels.sh`` downloads it, ``run.sh`` installs it, this module checks
  it. A folder passes when every pinned package has exactly one wheel of the pinned version whose tags install
  on CPython 3.12 / x86-64 Linux (python tag ``cp312`` or ``py3``, abi ``cp312``/``abi3``/``none``, platform
  ``any`` or ``manylinux*_x86_64``), and the folder fits in what the run tool carries (64 MiB, with margin).
- Names are compared normalised (PEP 503: case-folded, runs of ``-_.`` as one ``_``), as pip does.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

LIST = Path(__file__).with_name("wheels.txt")
CARRY_LIMIT_BYTES = 48 << 20  # of the 64 MiB carried, the rest is the repository itself
PYTHON_TAGS = {"cp312", "py3", "py312", "py2.py3"}
ABI_TAGS = {"cp312", "abi3", "none"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    built_from_sdist: bool  # no wheel on the registry: fetch_wheels.sh builds one (pure Python)


def read_pins(path: Path = LIST) -> list[Pin]:
    pins = []
    for line in path.read_text().splitlines():
        spec, _, comment = line.partition("#")
        if not spec.strip():
            continue
        name, _, version = spec.strip().partition("==")
        pins.append(Pin(name.strip(), version.strip(), "sdist only" in comment))
    return pins


@dataclass(frozen=True)
class WheelName:
    distribution: str
    version: str
    python: str
    abi: str
    platform: str


def parse_wheel_name(filename: str) -> WheelName:
    """``{dist}-{version}(-{build})?-{python}-{abi}-{platform}.whl`` (PEP 427)."""
    parts = filename[: -len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"{filename}: not a wheel file name")
    return WheelName(normalise(parts[0]), parts[1], parts[-3], parts[-2], parts[-1])


def installs_on_cp312_linux(wheel: WheelName) -> bool:
    platforms = wheel.platform.split(".")
    platform_ok = "any" in platforms or any(p.startswith("manylinux") and p.endswith("x86_64") for p in platforms)
    return wheel.python in PYTHON_TAGS and wheel.abi in ABI_TAGS and platform_ok


def check_folder(folder: Path, pins: list[Pin] | None = None) -> list[str]:
    """Problems with ``folder`` as the carried wheel set (empty list: it is complete and installable)."""
    pins = read_pins() if pins is None else pins
    if not folder.is_dir():
        return [f"{folder}: no such folder (run benchmarks/gpu/fetch_wheels.sh)"]
    problems, seen = [], {}
    for path in sorted(folder.iterdir()):
        if path.suffix != ".whl":
            problems.append(f"{path.name}: not a wheel")
            continue
        try:
            wheel = parse_wheel_name(path.name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        seen.setdefault(wheel.distribution, []).append((path.name, wheel))
    wanted = {normalise(p.name): p for p in pins}
    for key, pin in wanted.items():
        found = seen.get(key, [])
        if not found:
            problems.append(f"{pin.name}=={pin.version}: missing")
            continue
        if len(found) > 1:
            problems.append(f"{pin.name}: {len(found)} wheels ({', '.join(n for n, _ in found)})")
        for filename, wheel in found:
            if wheel.version != pin.version:
                problems.append(f"{filename}: version {wheel.version}, pinned {pin.version}")
            if not installs_on_cp312_linux(wheel):
                problems.append(f"{filename}: tags {wheel.python}-{wheel.abi}-{wheel.platform} do not install on "
                                "CPython 3.12 x86_64 Linux")
    problems += [f"{name}: not in wheels.txt" for key, files in seen.items() if key not in wanted for name, _ in files]
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if total > CARRY_LIMIT_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB of wheels: more than {CARRY_LIMIT_BYTES >> 20} MiB")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Check a folder of carried wheels against benchmarks/gpu/wheels.txt")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    problems = check_folder(args.folder)
    pins = read_pins()
    for problem in problems:
        print(f"wheels: {problem}")
    if not problems:
        total = sum(p.stat().st_size for p in args.folder.iterdir())
        print(f"wheels: {len(pins)} pinned packages present, cp312/py3 tags, {total / 2**20:.1f} MiB")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
