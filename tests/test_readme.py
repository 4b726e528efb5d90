"""The README's commands run, and print what the README shows (scripts/readme_check.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_commands_run_and_print_what_the_readme_shows(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "readme_check.py"), "--keep", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    ran = int(summary.split()[0])
    assert ran >= 8, summary  # data, two finetunes, evaluate, export, doctor, predict, bench, backbones ...


def test_readme_check_reads_blocks_and_matches_shapes():
    """The checker itself: commands and shown output from a README, numbers ignored, [...] as a wildcard."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_check as rc
    finally:
        sys.path.pop(0)
    text = "\n".join(
        [
            "```bash",
            "edgetl data digits --out data/d   # a comment",
            "edgetl bench pi@host:b \\",
            "    --all",
            "```",
            "",
            "```",
            "done 12 images in 1.5 s",
            "┃ variant ┃ p50 ms ┃",
            "$ edgetl doctor",
            "CPU       AVX2 [...]",
            "```",
            "prose",
            "```",
            "not an output block",
            "```",
        ]
    )
    steps, shown = rc.read_steps(text)
    assert [s.command for s in steps] == [
        "edgetl data digits --out data/d",
        "edgetl bench pi@host:b --all",
        "edgetl doctor",
    ]
    assert shown == {1: ["done 12 images in 1.5 s", "┃ variant ┃ p50 ms ┃"], 2: ["CPU       AVX2 [...]"]}
    assert rc.why_skip(steps[1].command, ROOT) == "needs a device over SSH"
    assert rc.why_skip("edgetl predict nowhere/b x.png", ROOT) == "needs nowhere/b"
    assert rc.why_skip("edgetl data digits --out nowhere/d", ROOT) is None
    printed = "done 3 images in 0.25 s\n┃ variant ┃ p50 ms ┃\n"
    assert rc.check(shown[1], printed) == []
    assert rc.check(shown[1], "done 3 images\n┃ variant ┃ p99 ms ┃\n") != []
    assert rc.check(shown[2], "CPU       AVX2 (256-bit), FMA\n") == []
