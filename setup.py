"""The wheel carries the top-level config folders (conf/, with experiments/ and sweeps/ behind its
experiment and sweep links) as ibq/conf, where ibq.config finds them from any directory."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        shutil.copytree(Path(__file__).parent / "conf", Path(self.build_lib) / "ibq" / "conf", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConfigs})
