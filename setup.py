"""Builds prefixkv's native module with the project's CMake build and puts it into the package.

pip (`pip install --no-build-isolation .`, `make python`) runs this: it configures the build folder
$PREFIXKV_BUILD (default: build/) with -DPREFIXKV_PYTHON=ON where it has no CMake cache yet, builds the
prefixkv_python target there, and copies the module it makes into the wheel. The metadata is in
pyproject.toml."""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = os.path.abspath(os.environ.get("PREFIXKV_BUILD", os.path.join(ROOT, "build")))
        configure = ["cmake", "-S", ROOT, "-B", build, "-DPREFIXKV_PYTHON=ON"]
        if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
            configure += ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DPREFIXKV_TESTS=OFF",
                          "-DPython_EXECUTABLE=" + sys.executable]
        subprocess.check_call(configure, stdout=subprocess.DEVNULL)
        subprocess.check_call(["cmake", "--build", build, "--target", "prefixkv_python"])
        built = glob.glob(os.path.join(build, "python", "prefixkv", "_core*.so"))
        if len(built) != 1:
            sys.exit(f"setup.py: expected one _core*.so in {build}/python/prefixkv, found {built}")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(built[0], target)


setup(ext_modules=[Extension("prefixkv._core", sources=[])], cmdclass={"build_ext": CMakeBuild},
      options={"build": {"build_base": os.path.join("build-pip")}})
