"""`edgetl --help` and every `edgetl CMD --help` import neither torch nor numpy.

Help is what a user types first, on the workstation and on a Raspberry Pi: importing torch costs
seconds, numpy a tenth of one. Command modules import heavy libraries inside command bodies, and
take option defaults and choices from numpy-free modules (:mod:`edgetl.workstation.options`,
:mod:`edgetl.core.formats`).
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("numpy", "torch", "torchvision", "onnxruntime", "openvino", "onnx", "PIL", "matplotlib")

# Runs in a fresh interpreter: each help is asked in turn and the heavy modules loaded so far are
# recorded, so the first command that pulls one in is the one named.
_SCRIPT = """
import contextlib, io, json, sys
import click
from edgetl.cli import main

heavy = {heavy!r}

def paths(group, prefix=()):
    yield prefix
    if isinstance(group, click.Group):
        for name, command in sorted(group.commands.items()):
            yield from paths(command, prefix + (name,))

report = []
for path in paths(main):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([*path, "--help"], standalone_mode=False, prog_name="edgetl")
    report.append({{"command": " ".join(("edgetl", *path)), "help_chars": len(out.getvalue()),
                   "loaded": [m for m in heavy if m in sys.modules]}})
print(json.dumps(report))
"""


def _help_report() -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(heavy=HEAVY)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_neither_torch_nor_numpy():
    report = _help_report()
    assert len(report) > 10, [r["command"] for r in report]  # the top level and every subcommand
    assert all(r["help_chars"] > 0 for r in report)
    offenders = [(r["command"], r["loaded"]) for r in report if {"numpy", "torch"} & set(r["loaded"])]
    assert not offenders, f"first help that imports numpy or torch: {offenders[0]} (all: {offenders})"


def test_python_m_edgetl_help_is_light():
    """The real entry point (``python -m edgetl --help``), not just ``main`` called in process."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['edgetl', '--help']\n"
        "try:\n"
        "    runpy.run_module('edgetl', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('\\nLOADED', sorted(m for m in ('numpy', 'torch') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "finetune" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"
