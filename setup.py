"""Builds the C preload library and the router's BPF socket guard as part of every install, so
nobody runs a compiler by hand.

`pip install .` runs build_py, which runs `make -C preload`, `make -C switchpath` and
`make -C bpf` and ships libshuntflow.so (and libshuntflow-musl.so, where musl-gcc is installed),
the router's switch path libsfswitch.so and guard.bpf.o inside the package (shuntflow/_native/);
shuntflow.native, shuntflow.router.native and shuntflow.router.guard find them there.
"""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithPreload(build_py):
    def run(self) -> None:
        super().run()
        subprocess.run(["make", "-C", str(ROOT / "preload")], check=True)
        target = Path(self.build_lib) / "shuntflow" / "_native"
        target.mkdir(parents=True, exist_ok=True)
        # libshuntflow-musl.so is built where musl-gcc is installed (scripts/setup.sh installs it).
        for name in ("libshuntflow.so", "libshuntflow-musl.so"):
            built = ROOT / "preload" / "build" / name
            if built.exists():
                shutil.copy2(built, target / name)
                os.chmod(target / name, 0o755)
        subprocess.run(["make", "-C", str(ROOT / "switchpath")], check=True)
        shutil.copy2(ROOT / "switchpath" / "build" / "libsfswitch.so", target / "libsfswitch.so")
        os.chmod(target / "libsfswitch.so", 0o755)
        subprocess.run(["make", "-C", str(ROOT / "bpf")], check=True)
        shutil.copy2(ROOT / "bpf" / "build" / "guard.bpf.o", target / "guard.bpf.o")


setup(cmdclass={"build_py": BuildWithPreload})
