#!/usr/bin/env python
"""Run the README's `edgetl` commands in a scratch folder and check that their output still has the
shape the README shows.

Each ```bash block's `edgetl ...` lines run in order (in a pseudo-terminal, as a user at a terminal
sees them: tables, not the tab-separated lines of a pipe). A command is skipped, and listed, when it
needs something a scratch folder cannot have: a device over SSH (user@host:...), or an input path no
earlier command created (your own photos, a second dataset). The plain ``` block that follows a bash
block is the output the README shows for it; lines starting with `$ edgetl ...` in such a block are
commands too, whose output follows them. The shape check: every table header the README shows must be
printed with the same columns, and every other shown line must match a printed line once numbers are
ignored (`[...]` in the README stands for any text). Exit 0 when everything ran and matched.

    python scripts/readme_check.py                 # the repository's README.md, in a temporary folder
    python scripts/readme_check.py --keep /tmp/rc  # keep the scratch folder
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
OUTPUT_FLAGS = {"--out", "--plot", "--save-dir"}
PATHLIKE = re.compile(r"(/|\.(png|jpe?g|bmp|webp|pth|ya?ml|tar\.gz|json|csv)$)")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
BOX = set("┏┓┗┛┡┩└┘┳┻╇━─┬┴┼╋╈╉╊")


@dataclass
class Step:
    command: str
    group: int  # the README block it came from: shown output is checked against the whole block's output


def read_steps(text: str) -> tuple[list[Step], dict[int, list[str]]]:
    """The README's commands in order, and per block the output lines the README shows for it.

    A plain block right after a bash block (blank lines between at most) is that block's output;
    a `$ edgetl ...` line inside it starts a command of its own, whose output follows it.
    """
    steps: list[Step] = []
    shown: dict[int, list[str]] = {}
    lang, body, inside, group = "", [], False, 0
    last_bash: int | None = None
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m and not inside:
            inside, lang, body = True, m.group(1), []
            continue
        if m and inside and not m.group(1):
            inside = False
            if lang in ("bash", "sh", "shell"):
                group += 1
                steps.extend(Step(c, group) for c in commands(body))
                last_bash = group
            elif lang == "" and (last_bash is not None or (body and body[0].startswith("$ edgetl "))):
                current = last_bash
                for out in body:
                    if out.startswith("$ edgetl "):
                        group += 1
                        current = group
                        steps.append(Step(commands([out[2:]])[0], group))
                    elif current is not None:
                        shown.setdefault(current, []).append(out)
                last_bash = None
            else:
                last_bash = None
            continue
        if inside:
            body.append(line)
        elif line.strip():
            last_bash = None
    return steps, shown


def commands(lines: list[str]) -> list[str]:
    out, pending = [], ""
    for line in lines:
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words and words[0] == "edgetl":
            out.append(re.sub(r"\s+", " ", re.sub(r"\s+#\s.*$", "", line)).strip())
    return out


# Device names the README gives with `edgetl device setup ... --name NAME` or `edgetl device add NAME`:
# later commands that use them (`edgetl bench pi4`, `nuc:/opt/models/digits`) need that device.
DEVICE_NAMES: set[str] = set()


def why_skip(command: str, work: Path) -> str | None:
    words = shlex.split(command)
    if words[1:3] in (["device", "setup"], ["device", "add"]):
        if "--name" in words[:-1]:
            DEVICE_NAMES.add(words[words.index("--name") + 1])
        elif words[2] == "add" and len(words) > 3:
            DEVICE_NAMES.add(words[3])
    if any("@" in w or w.startswith("ssh://") or w.split(":")[0] in DEVICE_NAMES for w in words[1:]):
        return "needs a device over SSH"
    previous = ""
    for w in words[1:]:
        is_output = previous in OUTPUT_FLAGS or previous == ">"
        previous = w
        if w.startswith("-") or is_output or not PATHLIKE.search(w):
            continue
        if not ((work / w).exists() or (any(c in w for c in "*?[") and glob.glob(str(work / w)))):
            return f"needs {w}"
    return None


def run_in_terminal(command: str, work: Path, timeout: float) -> tuple[int, str]:
    """Run ``command`` with stdout and stderr on a pseudo-terminal (as at a user's terminal)."""
    import pty

    leader, follower = pty.openpty()
    # A new user's machine: an empty feature cache (in the scratch folder), a wide terminal.
    env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm-256color", "NO_COLOR": "1"}
    env["EDGETL_CACHE"] = str(work / ".edgetl-cache")
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=timeout)
    finally:
        os.close(leader)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    # Progress bars redraw in place (carriage returns, cursor moves): every redraw becomes a line of
    # its own, so a log line printed in between is not glued to a bar.
    text = re.sub(r"\x1b\[[0-9;?]*m", "", text)  # styles
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", text).replace("\r", "\n")  # cursor moves
    return rc, text


def header(line: str) -> tuple[str, ...] | None:
    if "┃" not in line:
        return None
    return tuple(cell.strip() for cell in line.strip().strip("┃").split("┃"))


def shape(line: str) -> str:
    return re.sub(r"\s+", " ", NUMBER.sub("N", line)).strip()


def matches(shown: str, printed: list[str]) -> bool:
    pattern = re.escape(shape(shown)).replace(re.escape("[...]"), ".*")
    return any(re.fullmatch(pattern, shape(p)) for p in printed)


def check(shown_lines: list[str], printed: str) -> list[str]:
    lines = printed.splitlines()
    headers = {h for h in (header(p) for p in lines) if h}
    problems = []
    for shown in shown_lines:
        s = shown.strip()
        if not s or set(s) <= BOX or s.startswith(("│", "└", "┌", "(")):
            continue
        h = header(s)
        if h is not None:
            if h not in headers:
                problems.append(f"table header {h} not printed (printed: {sorted(headers) or 'no table'})")
        elif not matches(s, lines):
            problems.append(f"line not printed in this shape: {s!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--keep", type=Path, default=None, help="scratch folder to use and keep")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command")
    args = parser.parse_args(argv)
    steps, shown = read_steps(args.readme.read_text())
    work = args.keep or Path(tempfile.mkdtemp(prefix="edgetl-readme-"))
    work.mkdir(parents=True, exist_ok=True)
    edgetl_bin = Path(sys.executable).parent
    os.environ["PATH"] = f"{edgetl_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    failures, ran, skipped, seen = 0, 0, 0, set()
    printed_by_group: dict[int, str] = {}
    try:
        for i, step in enumerate(steps):
            if step.command not in seen:
                seen.add(step.command)
                reason = why_skip(step.command, work)
                if reason:
                    skipped += 1
                    print(f"skip  {step.command}  ({reason})")
                else:
                    rc, printed = run_in_terminal(step.command, work, args.timeout)
                    ran += 1
                    printed_by_group[step.group] = printed_by_group.get(step.group, "") + printed
                    print(f"{'ok  ' if rc == 0 else 'FAIL'}  {step.command}" + (f"  (exit code {rc})" if rc else ""))
                    if rc:
                        failures += 1
                        print("\n".join("      " + line for line in printed.splitlines()[-30:]))
            last_of_group = i + 1 == len(steps) or steps[i + 1].group != step.group
            if last_of_group and step.group in shown and step.group in printed_by_group:
                problems = check(shown[step.group], printed_by_group[step.group])
                print(
                    f"{'ok  ' if not problems else 'FAIL'}  output shape of: {step.command}"
                    + (" (and its block)" if i and steps[i - 1].group == step.group else "")
                )
                for p in problems:
                    print(f"      {p}")
                if problems:
                    failures += 1
                    tail = printed_by_group[step.group].splitlines()[-40:]
                    print("      --- printed ---\n" + "\n".join("      " + line for line in tail))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{ran} ran, {skipped} skipped, {failures} failed")
    return 1 if failures or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
