"""The CLI contract every command keeps (issue 13): its --json document validates against its schema
(docs/schemas), an error under --json is one error document with the exit code (2 usage, 1 failure)
and one line on stderr, -v/-q/--no-progress everywhere, TSV lines that never wrap, a top-level help
that cuts nothing.

The command list comes from ``edgetl.cli.main`` itself: a command added without an entry in
:data:`JSON_CASES` fails :func:`test_every_command_has_a_json_case`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from tests import test_bench, test_data, test_deploy, test_study
from tests.bundle_factory import build_bundle, write_colour_images
from tests.helpers import make_image_folder
from tests.run_factory import shared_run
from tests.schemas import validate_document
from tests.sshd import ALIAS

# Fixtures of other modules, asked for by name only by the cases that need them.
small_digits = test_data.small_digits  # scikit-learn's digits cut to 40 images
tiny_weights = test_study.tiny_weights  # a "pretrained" tiny trunk file
sshd = test_deploy.sshd  # a real OpenSSH server on loopback (skips without one, unless EDGETL_REQUIRE_SSHD=1)

COMMON = ("-v", "--verbose", "-q", "--quiet", "--no-progress")
BENCH_FAST = ["--iterations", "5", "--warmup", "1", "--no-cold-start"]
LONG = "a-folder-name-long-enough-that-an-80-column-wrap-would-split-it-" + "x" * 86  # 150 characters
MISSING = "no-such-path"
TINY_FINETUNE = ["--backbone", "tiny_test", "--weights", "none", "--epochs", "1", "--batch-size", "16"]
TINY_STUDY = [
    *("--backbone", "tiny_test", "--strategies", "feature-extraction,scratch"),
    *("--samples-per-class", "2", "--epochs", "1"),
]


def leaf_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    """Every command a user can run: ``{"data digits": <Command>, "predict": <Command>, ...}``."""
    out: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update(leaf_commands(command, (*prefix, name)))
        else:
            out[" ".join((*prefix, name))] = command
    return out


def cli(*args, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


class Inputs:
    """What the commands read, each built the first time a case asks for it (once per module)."""

    def __init__(self, factory: pytest.TempPathFactory):
        self.factory = factory

    @cached_property
    def root(self) -> Path:
        return self.factory.mktemp("cli-contract")

    @cached_property
    def images(self) -> Path:
        """Labelled red/green/blue folders: the bundle's colour head's classes."""
        return make_image_folder(self.root / "images", per_class=6)

    @cached_property
    def loose(self) -> Path:
        write_colour_images(self.root / "loose")
        return self.root / "loose"

    @cached_property
    def bundle(self) -> Path:
        return build_bundle(self.root / "bundle")

    @cached_property
    def run(self) -> Path:
        """A tiny torch run (tests/run_factory.py), trained on ``run.parent / "images"``."""
        return shared_run(self.factory)

    @cached_property
    def archive(self) -> Path:
        result = cli("pack", self.bundle, "--out", self.root / "bundle.tar.gz")
        assert result.exit_code == 0, result.output
        return self.root / "bundle.tar.gz"

    @cached_property
    def saved(self) -> list[Path]:
        """Two saved bench results (bench --save-dir), for --compare."""
        first = test_bench._save(self.bundle, self.root / "saved")  # 3 iterations, no cold start
        second = test_bench._save(self.bundle, self.root / "saved", "--threads", "1")
        return [first, second]

    @cached_property
    def not_json(self) -> Path:
        path = self.root / "not-json.json"
        path.write_text("{not json")
        return path

    @cached_property
    def long(self) -> Path:
        """A bundle, a run, images and a device profile under a 150-character folder name."""
        folder = self.root / LONG
        build_bundle(folder / "bundle")
        write_colour_images(folder / "images")
        shutil.copytree(self.run, folder / "run")
        (folder / "board.yaml").write_text("description: a board in a folder with a long name\n")
        return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    return Inputs(tmp_path_factory)


@pytest.fixture(autouse=True)
def device_inventory(monkeypatch, tmp_path_factory) -> Path:
    """`edgetl device ...` reads and writes $EDGETL_CONFIG_HOME/devices.yaml: a fresh one per test,
    outside tmp_path (the error cases check that nothing was written there), holding one device."""
    from edgetl.device.inventory import Device, save_device

    home = tmp_path_factory.mktemp("config")
    monkeypatch.setenv("EDGETL_CONFIG_HOME", str(home))
    save_device(Device(name="lab-pi", target="pi@192.0.2.10", groups=["lab"]))
    return home


def loop_device(server) -> str:
    """A device named loop in the test's inventory, reached through the loopback sshd; its name."""
    from edgetl.device.inventory import Device, save_device

    save_device(
        Device(name="loop", target=ALIAS, ssh_config=str(server.config), remote_edgetl=test_deploy.REMOTE_EDGETL)
    )
    return "loop"


@dataclass(frozen=True)
class Case:
    command: str  # as typed: "data digits"
    args: Callable[[Inputs, Path, dict], list]  # (inputs, tmp_path, fixtures) -> the words after the command
    fixtures: tuple[str, ...] = ()
    code: int = 0  # the exit code expected (error cases)
    marks: tuple = ()  # pytest marks of a case (slow, network)

    def argv(self, request: pytest.FixtureRequest, inputs: Inputs, tmp_path: Path) -> list[str]:
        fixtures = {name: request.getfixturevalue(name) for name in self.fixtures}
        return [*self.command.split(), *map(str, self.args(inputs, tmp_path, fixtures))]


JSON_CASES: dict[str, list[Case]] = {
    "data digits": [Case("data digits", lambda i, t, f: ["--out", t / "digits"], ("small_digits",))],
    "backbones": [Case("backbones", lambda i, t, f: [])],
    "finetune": [
        Case(
            "finetune",
            lambda i, t, f: [i.images, "--out", t / "run", *TINY_FINETUNE],
        ),
        Case(  # a cached fine-tune: its head searched again (head_refit)
            "finetune",
            lambda i, t, f: [i.images, "--out", t / "ft", *TINY_FINETUNE, "--strategy", "fine-tune", "--unfreeze", "1"],
        ),
    ],
    "evaluate": [
        Case("evaluate", lambda i, t, f: [i.run, i.run.parent / "images"]),  # the run's own folder
        Case("evaluate", lambda i, t, f: [i.bundle, i.images]),
    ],
    "study": [
        Case(
            "study",
            lambda i, t, f: [i.images, "--weights", f["tiny_weights"], *TINY_STUDY],
            ("tiny_weights",),
        )
    ],
    "probe": [Case("probe", lambda i, t, f: [i.images, "--backbones", "tiny_test:none", "--folds", "2"])],
    "export": [
        Case("export", lambda i, t, f: [i.run, "--out", t / "b", "--model-format", "onnx", "--precision", "fp32"])
    ],
    "info": [Case("info", lambda i, t, f: [i.bundle]), Case("info", lambda i, t, f: [i.run])],
    "pack": [Case("pack", lambda i, t, f: [i.bundle, "--out", t / "b.tar.gz"])],
    "unpack": [Case("unpack", lambda i, t, f: [i.archive, "--out", t / "b"])],
    "deploy": [
        Case(
            "deploy",
            lambda i, t, f: [i.bundle, f"{ALIAS}:{t / 'device' / 'b'}", *test_deploy.ssh_args(f["sshd"])],
            ("sshd",),
        )
    ],
    "predict": [Case("predict", lambda i, t, f: [i.bundle, i.loose])],
    "bench": [
        Case("bench", lambda i, t, f: [i.bundle, *BENCH_FAST]),
        Case("bench", lambda i, t, f: ["--compare", *i.saved]),
    ],
    "devices": [Case("devices", lambda i, t, f: []), Case("devices", lambda i, t, f: ["rpi4"])],
    "doctor": [Case("doctor", lambda i, t, f: [])],
    "device list": [Case("device list", lambda i, t, f: [])],
    "device show": [Case("device show", lambda i, t, f: ["lab-pi"])],
    "device add": [
        Case("device add", lambda i, t, f: ["pi5", "pi@192.0.2.11", "--group", "lab", "--profile", "rpi5"]),
        Case("device add", lambda i, t, f: ["loop", ALIAS, *test_deploy.ssh_args(f["sshd"]), "--check"], ("sshd",)),
    ],
    "device remove": [Case("device remove", lambda i, t, f: ["lab-pi"])],
    # An online install on the loopback device (its pip resolves from the index: about 40 s).
    "device setup": [
        Case(
            "device setup",
            lambda i, t, f: [ALIAS, "--venv", t / "venv", "--ssh-config", f["sshd"].config],
            ("sshd",),
            marks=(pytest.mark.slow, pytest.mark.network),
        )
    ],
    "device profiles": [Case("device profiles", lambda i, t, f: []), Case("device profiles", lambda i, t, f: ["rpi4"])],
    "device doctor": [Case("device doctor", lambda i, t, f: [loop_device(f["sshd"])], ("sshd",))],
    "device export-ansible": [
        Case("device export-ansible", lambda i, t, f: []),
        Case("device export-ansible", lambda i, t, f: ["--out", t / "fleet.yaml"]),
    ],
    # serve runs until stopped; --check loads, warms up and prints the ready document (tests/test_serve.py serves)
    "serve": [Case("serve", lambda i, t, f: [i.bundle, "--check"])],
    # learn writes into the bundle: a copy per case
    "learn": [Case("learn", lambda i, t, f: [copy_bundle(i.bundle, t / "b"), i.images, "--head", "learned"])],
}


def copy_bundle(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


# A runtime failure (a path that does not exist, an output in the way, a file that is not what it
# should be): exit 1. Usage errors (exit 2) are in USAGE_CASES and, for every command, a bogus option.
FAILURE_CASES: list[Case] = [
    Case("data digits", lambda i, t, f: ["--out", i.images], ("small_digits",), code=1),  # not empty
    Case("finetune", lambda i, t, f: [t / MISSING, "--out", t / "run"], code=1),
    Case("evaluate", lambda i, t, f: [t / MISSING, i.images], code=1),
    Case("evaluate", lambda i, t, f: [i.bundle, t / MISSING], code=1),
    Case("study", lambda i, t, f: [t / MISSING], code=1),
    Case("probe", lambda i, t, f: [t / MISSING, "--backbones", "tiny_test:none"], code=1),
    Case("export", lambda i, t, f: [t / MISSING, "--out", t / "b"], code=1),
    Case("info", lambda i, t, f: [t / MISSING], code=1),
    Case("pack", lambda i, t, f: [t / MISSING, "--out", t / "b.tar.gz"], code=1),
    Case("unpack", lambda i, t, f: [t / MISSING, "--out", t / "b"], code=1),
    Case("unpack", lambda i, t, f: [i.not_json, "--out", t / "b"], code=1),
    Case("deploy", lambda i, t, f: [t / MISSING, f"{ALIAS}:b"], code=1),
    Case("predict", lambda i, t, f: [t / MISSING, i.loose], code=1),
    Case("predict", lambda i, t, f: [i.bundle, t / MISSING], code=1),
    Case("bench", lambda i, t, f: [t / MISSING, *BENCH_FAST], code=1),
    Case("bench", lambda i, t, f: ["--compare", i.not_json], code=1),
    Case("bench", lambda i, t, f: ["--compare", t / MISSING], code=1),
    Case("doctor", lambda i, t, f: [t / MISSING], code=1),
    Case("device add", lambda i, t, f: ["loop", "ssh://nobody@127.0.0.1:1", "--check"], code=1),  # no sshd there
    Case("device setup", lambda i, t, f: ["ssh://nobody@127.0.0.1:1"], code=1),  # no sshd there
    Case("serve", lambda i, t, f: [t / MISSING, "--check"], code=1),
    Case("learn", lambda i, t, f: [t / MISSING, i.images, "--head", "x"], code=1),
    Case("learn", lambda i, t, f: [i.bundle, i.images, "--head", "colour"], code=1),  # the head exists
]

# Usage errors beyond an unknown option: a missing argument or option, an unknown name, a bad value.
USAGE_CASES: list[Case] = [
    Case("data digits", lambda i, t, f: [], code=2),
    Case("backbones", lambda i, t, f: ["extra"], code=2),
    Case("finetune", lambda i, t, f: [], code=2),
    Case("evaluate", lambda i, t, f: [], code=2),
    Case("study", lambda i, t, f: [], code=2),
    Case("probe", lambda i, t, f: [t], code=2),  # no --backbones
    Case("export", lambda i, t, f: [t], code=2),  # no --out
    Case("info", lambda i, t, f: [], code=2),
    Case("pack", lambda i, t, f: [t], code=2),  # no --out
    Case("unpack", lambda i, t, f: [t], code=2),  # no --out
    Case("deploy", lambda i, t, f: [t], code=2),  # no TARGET
    Case("predict", lambda i, t, f: [t], code=2),  # no IMAGES
    Case("predict", lambda i, t, f: [t, t, "--top-k", "0"], code=2),
    Case("bench", lambda i, t, f: [], code=2),
    Case("bench", lambda i, t, f: ["--compare"], code=2),
    Case("devices", lambda i, t, f: ["no-such-board"], code=2),
    Case("doctor", lambda i, t, f: [t, t], code=2),
    Case("device list", lambda i, t, f: ["extra"], code=2),
    Case("device show", lambda i, t, f: [], code=2),
    Case("device show", lambda i, t, f: ["no-such-device"], code=2),
    Case("device add", lambda i, t, f: ["pi5"], code=2),  # no TARGET
    Case("device add", lambda i, t, f: ["lab-pi", "pi@192.0.2.12"], code=2),  # exists, no --force
    Case("device add", lambda i, t, f: ["pi5", "pi@host:bundles"], code=2),  # a path in TARGET
    Case("device remove", lambda i, t, f: ["no-such-device"], code=2),
    Case("device profiles", lambda i, t, f: ["no-such-board"], code=2),
    Case("device export-ansible", lambda i, t, f: ["extra"], code=2),
    Case("device doctor", lambda i, t, f: [], code=2),  # no NAME
    Case("device doctor", lambda i, t, f: ["no-such-device"], code=2),
    Case("device doctor", lambda i, t, f: ["@no_such_group"], code=2),
    Case("device doctor", lambda i, t, f: ["@lab", "--parallel", "0"], code=2),
    Case("device setup", lambda i, t, f: [], code=2),  # no TARGET
    Case("device setup", lambda i, t, f: ["pi@rpi", "--extras", "train"], code=2),  # not a device extra
    Case("device setup", lambda i, t, f: ["pi@rpi", "--wheelhouse", t], code=2),  # without --offline
    Case("serve", lambda i, t, f: [i.bundle, "--host", "0.0.0.0", "--check"], code=2),  # another host, no --token-file
    Case("learn", lambda i, t, f: [i.bundle, i.images], code=2),  # no --head
    Case("learn", lambda i, t, f: [i.bundle, i.images, "--head", "a.b"], code=2),  # not a head name
]


def case_id(case: Case) -> str:
    return case.command.replace(" ", "-")


def params(cases: list[Case], prefix: str = "") -> list:
    """``pytest.param`` per case, named ``<prefix><command>-<n>`` (n counts each command's cases)."""
    seen: dict[str, int] = {}
    out = []
    for case in cases:
        n = seen[case.command] = seen.get(case.command, -1) + 1
        out.append(pytest.param(case, id=f"{prefix}{case_id(case)}-{n}", marks=case.marks))
    return out


def test_every_command_has_a_json_case():
    """A new command needs its --json case here (and its schema in docs/schemas)."""
    assert set(JSON_CASES) == set(leaf_commands())
    for name, cases in JSON_CASES.items():
        assert cases and all(c.command == name for c in cases), name
    assert {c.command for c in USAGE_CASES} == set(leaf_commands())
    assert {c.command for c in FAILURE_CASES} <= set(leaf_commands())
    assert {c.code for c in USAGE_CASES} == {2} and {c.code for c in FAILURE_CASES} == {1}


@pytest.mark.parametrize("case", params([c for cases in JSON_CASES.values() for c in cases]))
def test_json_document_validates_against_its_schema(case, inputs, tmp_path, request):
    argv = case.argv(request, inputs, tmp_path)
    result = cli(*argv, "--json")
    assert result.exit_code == 0, (argv, result.output)
    assert "Traceback" not in result.stderr, result.stderr
    doc = validate_document(result.stdout, case.command.replace(" ", "."))  # one document, nothing else
    assert "error" not in doc and isinstance(doc["results"], list) and doc["results"]


def assert_one_error(result, command: str, code: int) -> dict:
    """Exit ``code``, stdout one error document saying the same code, stderr one ``Error:`` line."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Traceback" not in result.stderr, result.stderr
    doc = validate_document(result.stdout, command.replace(" ", "."))
    assert "results" not in doc and "partial" not in doc, doc
    error = doc["error"]
    assert error["exit_code"] == code and error["type"] and error["message"]
    assert (error["type"] in ("UsageError", "ConfigError")) == (code == 2), error
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    assert error["message"] in lines[0]
    return doc


@pytest.mark.parametrize("command", sorted(leaf_commands()))
@pytest.mark.parametrize("json_flag", [["--json"], ["--format", "json"]], ids=["json", "format-json"])
def test_an_unknown_option_is_a_usage_error_document(command, json_flag):
    result = cli(*command.split(), "--no-such-option", *json_flag)
    doc = assert_one_error(result, command, 2)
    assert "--no-such-option" in doc["error"]["message"]


@pytest.mark.parametrize("case", params(USAGE_CASES, "usage-") + params(FAILURE_CASES, "failure-"))
def test_errors_under_json_are_one_document_and_one_line(case, inputs, tmp_path, request):
    argv = case.argv(request, inputs, tmp_path)
    result = cli(*argv, "--json")
    assert_one_error(result, case.command, case.code)
    assert not list(tmp_path.iterdir())  # the outputs asked for (in tmp_path): nothing written, nothing half-written


# --- -v, -q, --no-progress ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(leaf_commands()))
def test_every_command_takes_the_common_options(command):
    params = leaf_commands()[command].params
    opts = {opt for p in params if isinstance(p, click.Option) for opt in p.opts}
    assert set(COMMON) | {"--json", "--format"} <= opts, sorted(opts)
    # Before and after the command; --help shows them and exits 0 (an unknown option would exit 2).
    result = cli("-v", "-q", *command.split(), "-v", "-q", "--no-progress", "--help")
    assert result.exit_code == 0, result.output
    for flag in ("-v, --verbose", "-q, --quiet", "--no-progress"):
        assert flag in result.stdout, (command, flag)


@pytest.mark.parametrize(
    "before, after",
    [(["-q"], []), ([], ["-q"]), (["-v"], []), ([], ["-v"]), ([], ["--no-progress"]), (["-v"], ["-q"])],
)
def test_verbose_and_quiet_before_or_after_the_command(before, after):
    result = cli(*before, "devices", "rpi4", *after, "--json")
    assert result.exit_code == 0, result.output
    assert validate_document(result.stdout, "devices")["results"][0]["name"] == "rpi4"


def test_common_options_leave_the_json_document_alone(inputs):
    """-v, -q and --no-progress on a command that shows progress and logs (predict): logs go to
    stderr only, the records stay the same; -q leaves stderr empty."""
    plain = cli("predict", inputs.bundle, inputs.loose, "--json")
    for before, after in ([], ["-q"]), ([], ["--no-progress"]), ([], ["-v"]), (["-v"], []), (["-q"], []):
        result = cli(*before, "predict", inputs.bundle, inputs.loose, *after, "--json")
        assert result.exit_code == 0, result.output
        assert validate_document(result.stdout, "predict")["results"] == json.loads(plain.stdout)["results"]
        if "-q" in before + after:
            assert result.stderr == ""


# --- pipe output -------------------------------------------------------------------------------------


TSV_CASES = {
    "backbones": lambda long: ["backbones"],
    "devices": lambda long: ["devices"],
    "devices-one": lambda long: ["devices", long / "board.yaml"],
    "info-bundle": lambda long: ["info", long / "bundle"],
    "info-run": lambda long: ["info", long / "run"],
    "predict": lambda long: ["predict", long / "bundle", long / "images"],
}


@pytest.mark.parametrize("name", sorted(TSV_CASES))
@pytest.mark.parametrize("fmt", [[], ["--format", "tsv"]], ids=["default-in-a-pipe", "format-tsv"])
def test_tsv_lines_never_wrap(name, fmt, inputs):
    result = cli(*TSV_CASES[name](inputs.long), *fmt, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) >= 2, result.stdout
    fields = len(lines[0].split("\t"))
    assert fields >= 2, lines[0]
    assert [n for n, line in enumerate(lines) if len(line.split("\t")) != fields] == [], result.stdout
    if name not in ("backbones", "devices"):
        assert LONG in result.stdout  # the long path whole, on one line
        assert not any(line.startswith((" ", "│", "┃")) for line in lines)  # no table, no continuation


# --- help --------------------------------------------------------------------------------------------


def _help(group: list[str], columns: int) -> str:
    # CliRunner fixes Click's help width at 80 unless the context is given a terminal width.
    result = CliRunner().invoke(main, [*group, "--help"], terminal_width=columns)
    assert result.exit_code == 0, result.output
    return result.stdout


def _commands_section(text: str) -> list[str]:
    return text.split("\nCommands:\n", 1)[1].splitlines()


@pytest.mark.parametrize("group", [[], ["data"]], ids=["edgetl", "edgetl-data"])
def test_help_shows_every_command_s_short_help_whole(group):
    command = main
    for name in group:
        command = command.commands[name]
    # On an 80-column terminal the descriptions wrap but are never cut.
    section = _commands_section(_help(group, 80))
    assert not any("..." in line for line in section), section
    flat = " ".join(" ".join(section).split())
    for name, sub in command.commands.items():
        assert sub.short_help, f"{name} has no short_help (Click cuts its help's first sentence)"
        assert f"{name} {sub.short_help}" in flat, (name, sub.short_help)
    # On a wide terminal: one line each.
    wide = _commands_section(_help(group, 200))
    lines = {line.split()[0]: " ".join(line.split()[1:]) for line in wide if line.strip()}
    assert lines == {name: " ".join(sub.short_help.split()) for name, sub in command.commands.items()}


# --- a real process ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, code",
    [
        (lambda i: ["predict", i.bundle, i.loose], 0),
        (lambda i: ["bench", i.bundle, *BENCH_FAST, "--precision", "int8"], 0),
        (lambda i: ["predict", i.bundle, i.root / MISSING], 1),
        (lambda i: ["predict", i.bundle], 2),
    ],
    ids=["predict", "bench", "failure", "usage"],
)
def test_a_real_process_prints_one_document_on_stdout(args, code, inputs):
    """What the runtimes' C++ code writes to the file descriptors directly never reaches stdout."""
    argv = [sys.executable, "-m", "edgetl", *map(str, args(inputs)), "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=inputs.root)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    doc = validate_document(proc.stdout, args(inputs)[0])
    assert "Traceback" not in proc.stderr, proc.stderr
    if code:
        assert doc["error"]["exit_code"] == code
        assert [line for line in proc.stderr.splitlines() if line.startswith("Error:")] == [proc.stderr.strip()]
