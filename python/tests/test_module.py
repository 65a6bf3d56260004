"""The extension module as a shared object: it exports its init function and nothing else
(python/module.map), so no library loaded beside it can bind to the C++ it carries."""
import shutil
import subprocess

import prefixkv
import prefixkv._core as core


def test_the_module_exports_only_its_init_function():
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to read the module's dynamic symbols"
    out = subprocess.run([nm, "-D", "--defined-only", core.__file__], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip() and line.split()[-2] in "TtWwDdBbRrVviu"}
    assert exported == {"PyInit__core"}, sorted(exported)[:20]
    assert prefixkv.threads() >= 1
