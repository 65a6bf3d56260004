"""Every Python example of docs/PYTHON.md runs, in order, in one namespace (as a reader would paste
them), from the repository root."""
import contextlib
import io
import os
import re

from conftest import ROOT

DOC = ROOT / "docs" / "PYTHON.md"


def test_every_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 5, "the examples of docs/PYTHON.md were not found"
    namespace = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, code in enumerate(blocks):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{DOC.name} example {i + 1}", "exec"), namespace)
            assert out.getvalue().strip(), f"example {i + 1} printed nothing"
    finally:
        os.chdir(cwd)
    # The examples' own results, as the doc describes them.
    m = namespace["m"]
    assert namespace["imp"].shape[0] == m.n_layers
    assert namespace["prof"].budgets == [0.2, 0.5]
    assert len(namespace["res"]["records"]) == 6
