"""Fixtures of the Python module's tests: the bundled model (loaded once) and the prefixkv program
of the same build, whose outputs the module must reproduce."""
import json
import os
import pathlib
import subprocess

import pytest

import prefixkv

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "prefixkv-llava-tiny"
IMAGE = ROOT / "data" / "example.png"


def cli_path():
    return os.environ.get("PREFIXKV_BINARY", str(ROOT / "build" / "prefixkv"))


def cli(*args):
    """Runs the prefixkv program; its stdout, or a test failure with its stderr."""
    r = subprocess.run([cli_path(), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"prefixkv {' '.join(map(str, args))} failed:\n{r.stderr}"
    return r.stdout


def cli_json(*args):
    return json.loads(cli(*args, "--json"))


@pytest.fixture(scope="session")
def model():
    return prefixkv.Model(MODEL)
