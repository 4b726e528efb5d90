"""`edgetl evaluate`: training images left out (runs by path and bytes, bundles by recorded hashes),
--include-train, --split, a subset of the classes, unknown classes, the JSON document and the table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, validate_manifest, write_manifest
from edgetl.core.errors import BundleError, DataError
from edgetl.core.metrics import present_classes_report
from edgetl.workstation.export import export_bundle, resolve_options
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.run import load_run
from edgetl.workstation.train import finetune
from tests.helpers import make_image_folder
from tests.schemas import validate_document

CLASSES = ("a", "b", "c", "d", "e")  # random colours: a run that gets some validation images wrong
TINY = {
    "backbone": "tiny_test",
    "weights": "none",
    "batch_size": 16,
    "epochs": 10,
    "lr": 5e-2,
    "val_split": 0.25,
    "strategy": "feature-extraction",
    "head_search": False,
}  # a head that errs: the figures then say something


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def evaluate_json(*args) -> dict:
    result = run("evaluate", *args, "--json")
    assert result.exit_code == 0, result.output
    return validate_document(result.stdout, "evaluate")


def one_line_error(result, code: int, *patterns: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, TypeError, ValueError))
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for pattern in patterns:
        assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def data(root) -> Path:
    return make_image_folder(root / "images", classes=CLASSES, per_class=16, seed=3)


@pytest.fixture(scope="module")
def trained(root, data):
    """A real `finetune` run on ``data`` (80 images: 60 train, 20 validation) and its files."""
    finetune(data, root / "run", config=TrainConfig(**TINY), progress=False, cache_dir=root / "cache")
    return load_run(root / "run")


@pytest.fixture(scope="module")
def bundle(root, trained) -> Path:
    options = resolve_options(formats=("onnx",), precisions=("fp32",))
    export_bundle(trained.path, root / "bundle", options, progress=False)
    return root / "bundle"


def test_a_run_on_its_own_training_folder_gets_its_validation_figure(trained, data):
    """The issue's test: same images, same model, so exactly the run's metrics.json figures."""
    doc = evaluate_json(trained.path, data)
    assert (doc["kind"], doc["runtime"], doc["precision"], doc["variant"]) == ("run", "pytorch", "fp32", None)
    assert (doc["data"], doc["split"], doc["include_train"], doc["head"]) == (str(data), None, False, "default")
    [rec] = doc["results"]
    metrics = trained.metrics
    assert 0 < metrics["val_top1"] < 1  # a run that errs, so the figure tells something
    assert rec["top1"] == metrics["val_top1"] and rec["n"] == metrics["n_val"] == len(trained.val_samples) == 20
    assert rec["per_class"] == metrics["per_class"] and rec["confusion"] == metrics["confusion"]
    assert (rec["excluded_train"], rec["included_train"], rec["train_overlap_checked"]) == (60, 0, True)
    assert rec["labels"] == list(CLASSES) and rec["missing_classes"] == [] and rec["confusion_other"] == [0] * 5
    assert rec["warnings"] == [] and rec["skipped"] == []


def test_include_train_scores_every_image_and_says_so(trained, data):
    result = run("evaluate", trained.path, data, "--include-train", "--json")
    assert result.exit_code == 0, result.output
    assert "--include-train: 60 training image(s)" in result.stderr and "optimistic" in result.stderr
    [rec] = validate_document(result.stdout, "evaluate")["results"]
    assert (rec["n"], rec["excluded_train"], rec["included_train"]) == (80, 0, 60)
    assert any("optimistic" in w for w in rec["warnings"])
    [train] = evaluate_json(trained.path, "--split", "train")["results"]
    # The whole folder's figure is the validation and training figures weighted by their counts.
    assert rec["top1"] * 80 == pytest.approx(trained.metrics["val_top1"] * 20 + train["top1"] * 60)


def test_split_scores_exactly_the_recorded_files(trained):
    val = evaluate_json(trained.path, "--split", "val")
    assert (val["data"], val["split"], val["include_train"]) == (None, "val", False)
    [rec] = val["results"]
    assert rec["top1"] == trained.metrics["val_top1"] and rec["confusion"] == trained.metrics["confusion"]
    assert (rec["n"], rec["excluded_train"], rec["included_train"]) == (20, 0, 0)
    [train] = evaluate_json(trained.path, "--split", "train")["results"]
    assert (train["n"], train["included_train"]) == (60, 60)
    everything = evaluate_json(trained.path, "--split", "all")
    assert everything["include_train"] is True and everything["results"][0]["n"] == 80


def test_a_copy_of_the_data_under_other_names_is_recognised_by_its_bytes(trained, data, tmp_path):
    copy = tmp_path / "copy"
    for path in sorted(data.rglob("*.png")):
        target = copy / path.parent.name / f"renamed-{path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    [rec] = evaluate_json(trained.path, copy)["results"]
    assert (rec["n"], rec["excluded_train"], rec["top1"]) == (20, 60, trained.metrics["val_top1"])


def test_a_folder_with_some_of_the_classes_is_scored_on_those(trained, tmp_path):
    field = tmp_path / "field"
    for s in trained.val_samples:
        name = trained.labels[s.label]
        if name in ("b", "d"):
            (field / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s.path, field / name / Path(s.path).name)
    [rec] = evaluate_json(trained.path, field)["results"]
    assert rec["labels"] == ["b", "d"] and rec["missing_classes"] == ["a", "c", "e"]
    assert set(rec["per_class"]) == {"b", "d"} and rec["n"] == 8
    assert len(rec["confusion"]) == 2 and all(len(row) == 2 for row in rec["confusion"])
    full = trained.metrics["confusion"]
    for i, c in enumerate((1, 3)):  # the rows of b and d in the run's own confusion matrix
        assert rec["confusion"][i] == [full[c][1], full[c][3]]
        assert rec["confusion_other"][i] == sum(full[c]) - full[c][1] - full[c][3]
        assert rec["per_class"][trained.labels[c]] == trained.metrics["per_class"][trained.labels[c]]
    assert rec["top1"] == (full[1][1] + full[3][3]) / 8
    table = run("evaluate", trained.path, field, "--format", "tsv")
    assert table.exit_code == 0, table.output
    assert "head\ttrue\tb\td\t(other)" in table.stdout.splitlines()
    assert "default\tpytorch-fp32\t" in table.stdout and "missing" in table.stdout.splitlines()[0]
    table = run("evaluate", trained.path, field, "--format", "table")
    assert "not in DATA (scored on the other classes): a, c, e" in table.stdout


def test_an_unknown_class_folder_is_one_error_naming_it(trained, data, tmp_path):
    folder = shutil.copytree(data, tmp_path / "d")
    shutil.copytree(folder / "a", folder / "zebra")
    one_line_error(run("evaluate", trained.path, folder), 1, "'zebra'", "does not know")
    result = run("evaluate", trained.path, folder, "--json")
    doc = validate_document(result.stdout, "evaluate")
    assert doc["error"]["type"] == "DataError" and "'zebra'" in doc["error"]["message"]
    one_line_error(run("evaluate", trained.path, tmp_path / "nope"), 1, "does not exist")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["{run}", "{data}", "--split", "val"], "not both"),
        (["{run}"], "give DATA"),
        (["{run}", "--split", "train", "--include-train"], "--include-train applies to DATA"),
        (["{run}", "{data}", "--precision", "int8"], "--precision applies to bundles"),
        (["{run}", "{data}", "--runtime", "openvino"], "--runtime applies to bundles"),
        (["{run}", "{data}", "--head", "other"], "a run has one head"),
        (["{run}", "{data}", "--device", "tpu"], "--device must be"),
        (["{bundle}", "--split", "val"], "--split applies to runs"),
        (["{bundle}", "{data}", "--device", "cpu"], "--device is the torch device for runs"),
        (["{bundle}"], "give DATA"),
        (["{run}", "{data}", "--precision", "fp8"], "fp8"),
    ],
)
def test_usage_errors_exit_2_with_one_line(trained, data, bundle, args, pattern):
    args = [a.format(run=trained.path, data=data, bundle=bundle) for a in args]
    one_line_error(run("evaluate", *args), 2, pattern)


def test_a_bundle_leaves_out_the_training_images_it_recorded(trained, data, bundle, tmp_path):
    doc = evaluate_json(bundle, data)
    assert (doc["kind"], doc["variant"], doc["runtime"], doc["precision"]) == (
        "bundle",
        "onnx-fp32",
        "onnxruntime",
        "fp32",
    )
    [rec] = doc["results"]
    # fp32 agrees with PyTorch on every validation image (export checked it): the run's figure.
    assert (rec["n"], rec["excluded_train"], rec["top1"]) == (20, 60, trained.metrics["val_top1"])
    assert rec["confusion"] == trained.metrics["confusion"]
    copy = shutil.copytree(data, tmp_path / "elsewhere")  # the bundle knows bytes, not paths
    assert evaluate_json(bundle, copy)["results"][0]["excluded_train"] == 60
    [everything] = evaluate_json(bundle, data, "--include-train")["results"]
    assert (everything["n"], everything["excluded_train"], everything["included_train"]) == (80, 0, 60)
    m = read_manifest(bundle)
    assert len(m["heads"]["default"]["training_data"]["train_sha256_prefixes"]) == 60 * 16


def test_an_older_bundle_without_the_record_scores_everything_and_warns(data, bundle, tmp_path):
    old = shutil.copytree(bundle, tmp_path / "old")
    m = read_manifest(old)
    del m["heads"]["default"]["training_data"]
    write_manifest(old, m)
    result = run("evaluate", old, data, "--json")
    assert result.exit_code == 0, result.output
    assert "overlap with the training data cannot be checked" in result.stderr
    [rec] = validate_document(result.stdout, "evaluate")["results"]
    assert (rec["n"], rec["excluded_train"], rec["included_train"], rec["train_overlap_checked"]) == (
        80,
        None,
        None,
        False,
    )
    assert "cannot be checked" in rec["warnings"][0]


def test_the_table_has_the_same_three_sections_in_a_pipe(trained, data):
    result = run("evaluate", trained.path, data)  # CliRunner's stdout is not a terminal: tsv
    assert result.exit_code == 0, result.output
    sections = [s.splitlines() for s in result.stdout.strip("\n").split("\n\n")]
    assert [s[0].split("\t")[:2] for s in sections] == [["head", "variant"], ["head", "class"], ["head", "true"]]
    summary = dict(zip(sections[0][0].split("\t"), sections[0][1].split("\t"), strict=True))
    assert (summary["top1"], summary["n"], summary["excluded_train"]) == (
        f"{trained.metrics['val_top1']:.4f}",
        "20",
        "60",
    )
    assert len(sections[1]) == 1 + 5 and len(sections[2]) == 1 + 5
    assert "(other)" not in sections[2][0]  # every class is present
    help_text = run("evaluate", "--help").output
    assert "--split" in help_text and "--include-train" in help_text and "onnxruntime" in help_text


def test_present_classes_report_and_the_manifest_record_are_checked():
    rep = present_classes_report([0, 0, 2, 2], [0, 1, 2, 2], ["x", "y", "z"], [0, 2])
    assert rep["labels"] == ["x", "z"] and rep["missing_classes"] == ["y"]
    assert rep["confusion"] == [[1, 0], [0, 2]] and rep["confusion_other"] == [1, 0] and rep["top1"] == 0.75
    assert present_classes_report([], [], ["x", "y"], [0])["top1"] is None
    from edgetl.core.imagefolder import parse_hash_prefixes

    with pytest.raises(DataError):
        parse_hash_prefixes("abc")


@pytest.mark.parametrize(
    "record",
    [
        "not an object",
        {"train_sha256_prefixes": "0123"},
        {"train_sha256_prefixes": "ABCDEF0123456789"},
        {"train_images": -1},
        {"train_images": True},
    ],
)
def test_a_bad_training_record_is_a_bundle_error(bundle, record):
    m = json.loads((bundle / "manifest.json").read_text())
    m["heads"]["default"]["training_data"] = record
    with pytest.raises(BundleError, match="training_data"):
        validate_manifest(m, bundle)
