"""Builds the C preload library as part of every install, so nobody runs a compiler by hand.

`pip install .` runs build_py, which runs `make -C preload` and ships libshuntflow.so inside the
package (shuntflow/_native/); shuntflow.native finds it there.
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
        shutil.copy2(ROOT / "preload" / "build" / "libshuntflow.so", target / "libshuntflow.so")
        os.chmod(target / "libshuntflow.so", 0o755)


setup(cmdclass={"build_py": BuildWithPreload})
