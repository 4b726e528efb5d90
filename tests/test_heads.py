"""Many heads, one trunk: finetune --trunk-from BUNDLE, export --add-to BUNDLE --head NAME, predict --head all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file
from edgetl.core.errors import BundleError, ConfigError, ExportError, OutputExistsError, RunError
from edgetl.device.runtime import open_bundle
from edgetl.workstation.add_head import add_head
from edgetl.workstation.export import export_bundle, resolve_options
from edgetl.workstation.heads import finetune_head
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.run import load_run
from tests.helpers import make_image_folder
from tests.run_factory import all_profile_export, make_run, shared_run
from tests.schemas import validate_document

TASK2 = ("cyan", "magenta", "yellow")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("heads")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Every format and precision, with merged graphs (read only: tests that change it copy it)."""
    return all_profile_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def run1(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def data2(root) -> Path:
    return make_image_folder(root / "task2", classes=TASK2, per_class=20, seed=5)


@pytest.fixture(scope="module")
def head_run(bundle, data2, root) -> Path:
    result = CliRunner().invoke(
        main,
        [
            "finetune",
            str(data2),
            "--out",
            str(root / "run2"),
            "--trunk-from",
            str(bundle),
            "--epochs",
            "60",
            "--patience",
            "60",
            "--lr",
            "0.05",
            "--no-progress",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "finetune")["results"][0]
    assert doc["trunk_from"]["trunk"] == "onnx/trunk.fp32.onnx" and doc["strategy"] == "feature-extraction"
    return Path(doc["run_dir"])


@pytest.fixture(scope="module")
def added(bundle, head_run, root) -> tuple[Path, dict, dict]:
    """A copy of the bundle with the second head added, and the file checksums from before."""
    two = shutil.copytree(bundle, root / "two-heads")
    before = {rel: rec["sha256"] for rel, rec in read_manifest(two)["files"].items()}
    result = CliRunner().invoke(
        main, ["export", str(head_run), "--add-to", str(two), "--head", "tint", "--no-progress", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    if "results" in doc:  # export's envelope: one record per variant
        doc = {"variants": {r["name"]: r for r in doc["results"]}}
    return two, before, doc


def test_head_run_records_the_trunk_and_holds_only_a_head(head_run, bundle):
    run = load_run(head_run)
    m = read_manifest(bundle)
    assert (
        run.trunk_from["sha256"]
        == m["files"]["onnx/trunk.fp32.onnx"]["sha256"]
        == sha256_file(bundle / "onnx/trunk.fp32.onnx")
    )
    assert run.trunk_from["backbone"] == m["backbone"]["name"] and run.feature_dim == m["backbone"]["feature_dim"]
    assert run.config["preprocessing"] == m["preprocessing"] and run.labels == list(TASK2)
    assert set(torch.load(head_run / "model.pt", weights_only=True)) == {"head"}
    for name in ("config.json", "labels.json", "split.json", "history.json", "metrics.json", "history.png"):
        assert (head_run / name).is_file()
    assert run.metrics["val_top1"] >= 0.9
    with pytest.raises(RunError, match="holds only a head"):
        run.build_model()


def test_head_is_trained_on_the_shipped_trunk_features(head_run, bundle):
    """The run's PyTorch head on the bundle's ONNX Runtime features reproduces the run's val top-1."""
    run = load_run(head_run)
    predictor = open_bundle(bundle).load(runtime="onnxruntime", precision="fp32")
    feats = predictor.features(
        predictor.preprocess(
            [__import__("edgetl.core.preprocess").core.preprocess.load_image(s.path) for s in run.val_samples]
        )
    )
    with torch.inference_mode():
        pred = run.build_head()(torch.from_numpy(feats)).argmax(1).numpy()
    assert float((pred == np.array([s.label for s in run.val_samples])).mean()) == pytest.approx(
        run.metrics["val_top1"]
    )


def test_add_to_leaves_the_trunk_untouched_and_checks_every_variant(added):
    two, before, doc = added
    m = read_manifest(two)
    for rel, sha in before.items():
        assert m["files"][rel]["sha256"] == sha == sha256_file(two / rel)
    new = set(m["files"]) - set(before)
    merged = {v["merged"]["tint"] for v in m["variants"].values()}
    heads = {"onnx/head.tint.onnx", "openvino/head.tint.xml", "litert/head.tint.tflite", "ncnn/head.tint.param"}
    assert new == heads | merged | {"stats/tint.npz"}  # its feature statistics, for learn --extend and unfamiliar
    assert m["heads"]["tint"]["origin"]["where"] == "workstation" and m["heads"]["tint"]["familiarity"]["threshold"] > 0
    assert "litert/merged.tint.int8.tflite" in merged and "ncnn/merged.tint.fp32.param" in merged
    assert "onnx/merged.tint.int8.onnx" in merged and "openvino/merged.tint.fp32.xml" in merged
    assert set(doc["variants"]) == set(m["variants"]) and len(m["variants"]) >= 6
    assert all(v["heads"]["tint"] in new for v in m["variants"].values())
    for name, v in doc["variants"].items():
        if name.endswith("fp32"):
            assert v["max_abs_diff"] <= 1e-3 and v["top1_agreement"] == 1.0
        else:
            assert v["top1_drop_pp"] <= 1.0
    assert m["heads"]["tint"]["labels"] == list(TASK2) and set(m["heads"]["tint"]["metrics"]) == set(doc["variants"])
    for name, metrics in m["heads"]["tint"]["metrics"].items():  # the manifest's figures are the ones printed
        assert {k: doc["variants"][name][k] for k in metrics} == metrics
    assert m["default_head"] == "default"
    assert [p.name for p in two.parent.iterdir() if p.name.startswith(".")] == []


def test_the_added_head_records_its_training_images_and_evaluate_leaves_them_out(
    added, head_run, data2, tmp_path_factory
):
    two, _, _ = added
    run = load_run(head_run)
    head = read_manifest(two)["heads"]["tint"]
    assert str(tmp_path_factory.getbasetemp()) not in (two / "manifest.json").read_text()  # names, not paths
    assert head["run"] == {
        "name": head_run.name,
        "strategy": "feature-extraction (trunk from bundle)",
        "val_top1": run.metrics["val_top1"],
    }
    prefixes = "".join(sorted(sha256_file(s.path)[:16] for s in run.train_samples))
    assert head["training_data"]["train_sha256_prefixes"] == prefixes
    assert (head["training_data"]["train_images"], head["training_data"]["val_images"]) == (48, 12)
    result = CliRunner().invoke(main, ["evaluate", str(two), str(data2), "--head", "tint", "--json"])
    assert result.exit_code == 0, result.output
    [rec] = validate_document(result.stdout, "evaluate")["results"]
    # fp32 agrees with PyTorch on every validation image (checked when the head was added).
    assert (rec["head"], rec["n"], rec["excluded_train"]) == ("tint", 12, 48)
    assert rec["top1"] == run.metrics["val_top1"] and rec["confusion"] == run.metrics["confusion"]
    result = CliRunner().invoke(main, ["evaluate", str(two), str(data2), "--head", "all"])
    assert result.exit_code == 2 and "different labels" in result.stderr


def test_predict_head_all_returns_both_heads(added, data2):
    two, _, _ = added
    images = [str(sorted((data2 / c).iterdir())[0]) for c in TASK2]
    for runtime in ("onnxruntime", "openvino"):
        result = CliRunner().invoke(
            main, ["predict", str(two), *images, "--head", "all", "--runtime", runtime, "--json"]
        )
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        records = doc["results"] if isinstance(doc, dict) else doc  # predict's envelope, or its older list
        assert [(r["image"], r["head"]) for r in records] == [(i, h) for i in images for h in ("default", "tint")]
        assert [r["label"] for r in records if r["head"] == "tint"] == list(TASK2)


def test_the_trunk_runs_once_per_input_for_all_heads(added, data2):
    two, _, _ = added
    predictor = open_bundle(two).load(heads="all")
    calls = []
    trunk = predictor._trunk
    predictor._trunk = lambda x: calls.append(len(x)) or trunk(x)
    images = sorted((data2 / "cyan").iterdir())[:5]
    x = predictor.preprocess([__import__("PIL.Image").Image.open(p).convert("RGB") for p in images])
    logits = predictor.logits(x)
    assert calls == [5] and set(logits) == {"default", "tint"}
    predictor.predict(images, batch_size=2)
    assert calls == [5, 2, 2, 1]  # one trunk pass per batch, not per head


def test_any_subset_of_heads_loads(added):
    two, _, _ = added
    bundle = open_bundle(two)
    assert bundle.load(heads="tint").head_names == ("tint",)
    assert bundle.load(runtime="openvino", precision="int8", heads=["tint", "default"]).head_names == (
        "tint",
        "default",
    )
    assert bundle.load(merged=True, heads="tint").merged


def test_add_to_refuses_another_trunk_an_existing_head_and_a_normal_run(bundle, head_run, run1, tmp_path):
    two = shutil.copytree(bundle, tmp_path / "b")
    add_head(head_run, two, "tint", progress=False)
    with pytest.raises(OutputExistsError, match="already has a head 'tint'"):
        add_head(head_run, two, "tint", progress=False)
    with pytest.raises(ConfigError, match="--head 'a.b'"):
        add_head(head_run, two, "a.b", progress=False)
    with pytest.raises(ExportError, match="was not trained on a bundle's trunk"):
        add_head(run1, two, "again", progress=False)
    other = make_run(tmp_path / "other-run", make_image_folder(tmp_path / "other-images"), seed=3)
    other_options = resolve_options(formats=("onnx",), precisions=("fp32",))
    other_bundle = export_bundle(other, tmp_path / "other", other_options, progress=False)["bundle"]
    before = (Path(other_bundle) / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match=r"is not the trunk run .* was trained on \(sha256"):
        add_head(head_run, other_bundle, "tint", progress=False)
    assert (Path(other_bundle) / "manifest.json").read_bytes() == before
    with pytest.raises(ExportError, match="holds a head trained on the trunk of bundle"):
        export_bundle(head_run, tmp_path / "new", progress=False)


def test_a_failed_check_leaves_the_bundle_as_it_was(bundle, head_run, tmp_path):
    two = shutil.copytree(bundle, tmp_path / "b")
    before = {p.relative_to(two).as_posix(): p.read_bytes() for p in two.rglob("*") if p.is_file()}
    with pytest.raises(
        ExportError, match=r"variant \S+-(fp16|int8) \(head tint\) loses .* pp validation top-1 .*--max-drop -1 pp"
    ):
        add_head(head_run, two, "tint", max_drop=-1.0, progress=False)
    assert {p.relative_to(two).as_posix(): p.read_bytes() for p in two.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_trunk_from_refuses_trunk_options_and_bundles_without_fp32(bundle, data2, tmp_path):
    result = CliRunner().invoke(
        main,
        ["finetune", str(data2), "--out", str(tmp_path / "r"), "--trunk-from", str(bundle), "--backbone", "resnet18"],
    )
    assert result.exit_code == 2 and "--backbone does not apply with --trunk-from" in result.stderr  # usage error
    with pytest.raises(ConfigError, match="--img-size 64 differs"):
        finetune_head(data2, tmp_path / "r", trunk_from=bundle, config=TrainConfig(img_size=64), progress=False)
    int8_only = shutil.copytree(bundle, tmp_path / "int8")
    m = read_manifest(int8_only)
    for name in [v for v in m["variants"] if v.endswith("fp32")]:
        del m["variants"][name]
    (int8_only / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="no onnx-fp32 variant"):
        finetune_head(data2, tmp_path / "r", trunk_from=int8_only, progress=False)
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(main, ["export", str(bundle), "--add-to", str(bundle)])
    assert result.exit_code == 2 and "--add-to BUNDLE needs --head NAME" in result.stderr


def test_partial_leaves_the_head_out_of_variants_that_miss_the_bar(bundle, head_run, tmp_path):
    two = shutil.copytree(bundle, tmp_path / "b")
    trunks = {rel: rec["sha256"] for rel, rec in read_manifest(two)["files"].items() if rec["role"] == "trunk"}
    result = CliRunner().invoke(
        main, ["export", str(head_run), "--add-to", str(two), "--head", "tint", "--max-drop", "-1", "--no-progress"]
    )
    assert result.exit_code == 1 and "pass --partial to add the head to the other variants only" in result.stderr
    doc = add_head(head_run, two, "tint", max_drop=-1.0, partial=True, progress=False)
    m = read_manifest(two)
    kept = {n for n, v in m["variants"].items() if "tint" in v["heads"]}
    assert kept == {"onnx-fp32", "openvino-fp32", "litert-fp32", "ncnn-fp32"}
    assert set(doc["left_out"]) == set(m["variants"]) - kept
    assert set(m["heads"]["tint"]["left_out"]) == set(doc["left_out"])
    assert "loses" in doc["left_out"]["onnx-int8"] and "--max-drop -1 pp" in doc["left_out"]["onnx-int8"]
    assert not any(rel.startswith(("onnx/merged.tint.int8", "openvino/merged.tint.int8")) for rel in m["files"])
    assert {rel: m["files"][rel]["sha256"] for rel in trunks} == trunks
    bundle_ = open_bundle(two)
    assert bundle_.load(precision="int8", heads="all").head_names == ("default",)
    with pytest.raises(BundleError, match="no head 'tint' in this variant"):
        bundle_.load(precision="int8", heads="tint")


def test_add_to_checks_the_pinned_inference_precision(bundle, head_run, tmp_path, monkeypatch):
    """As in export: a variant measured in another precision than the one it pins is refused."""
    import dataclasses

    from edgetl.device.backends import BACKENDS

    real = BACKENDS["openvino"].loader

    def other_precision(path, **kw):
        model = real(path, **kw)
        model.runtime_info["inference_precision"] = "bf16" if kw.get("precision") != "bf16" else "f32"
        return model

    two = shutil.copytree(bundle, tmp_path / "b")
    before = (two / "manifest.json").read_bytes()
    monkeypatch.setitem(BACKENDS, "openvino", dataclasses.replace(BACKENDS["openvino"], loader=other_precision))
    with pytest.raises(ExportError, match=r"openvino-fp32 \(head tint\): OpenVINO ran .* although f32 was pinned"):
        add_head(head_run, two, "tint", progress=False)
    assert (two / "manifest.json").read_bytes() == before


def test_add_to_gives_a_bf16_merged_graph_the_variants_bar(bundle, head_run, tmp_path, monkeypatch):
    """A bf16 merged graph is not compared exactly (bf16 rounds where the graphs meet) but gets the
    variant's own accuracy bar; simulated by pinning bf16 on a merged variant and breaking its merged logits."""

    two = shutil.copytree(bundle, tmp_path / "b")
    m = read_manifest(two)
    m["variants"]["openvino-fp16"]["inference_precision"] = "bf16"
    (two / "manifest.json").write_text(json.dumps(m))
    import edgetl.workstation.add_head as ah

    real_check = ah.check_merged

    def flipped(name, var, merged_logits, split_logits, **kw):
        return real_check(name, var, -merged_logits if name == "openvino-fp16" else merged_logits, split_logits, **kw)

    monkeypatch.setattr(ah, "check_merged", flipped)
    # This CPU may not run bf16: report the pinned precision as run.
    monkeypatch.setattr(ah, "check_precision_pin", lambda name, var, info, **kw: var.get("inference_precision"))
    with pytest.raises(ExportError, match=r"openvino-fp16 \(merged graph\) loses"):
        add_head(head_run, two, "tint", progress=False)


def test_a_head_learned_on_the_device_then_one_from_the_workstation(bundle, head_run, data2, root):
    """`edgetl learn` on the bundle with every format (ONNX, OpenVINO, LiteRT, NCNN; fp32 and int8;
    merged graphs): the learned head goes into every variant (not into merged graphs, which the
    device does not write); the workstation then adds a head to that bundle with `export --add-to`,
    and neither the trunks nor the learned head's files change."""
    learned_bundle = shutil.copytree(bundle, root / "learned")
    result = CliRunner().invoke(
        main, ["learn", str(learned_bundle), str(data2), "--head", "device-tint", "--no-progress", "--json"]
    )
    assert result.exit_code == 0, result.output
    learned = validate_document(result.stdout, "learn")["results"][0]
    m = read_manifest(learned_bundle)
    assert set(learned["variants"]) == set(m["variants"]) and not learned["left_out"]
    assert {v["format"] for v in m["variants"].values()} == {"onnx", "openvino", "litert", "ncnn"}
    assert all("device-tint" not in (v.get("merged") or {}) for v in m["variants"].values())
    before = {rel: rec["sha256"] for rel, rec in m["files"].items()}
    CliRunner().invoke(
        main, ["export", str(head_run), "--add-to", str(learned_bundle), "--head", "tint", "--no-progress"]
    )
    after = read_manifest(learned_bundle)
    assert {"device-tint", "tint"} <= set(after["heads"]) and after["heads"]["tint"]["origin"]["where"] == "workstation"
    assert all(after["files"][rel]["sha256"] == sha for rel, sha in before.items())
    out = CliRunner().invoke(
        main, ["predict", str(learned_bundle), str(data2 / "cyan"), "--head", "all", "--runtime", "ncnn", "--json"]
    )
    records = json.loads(out.stdout)["results"]
    assert {r["head"] for r in records} >= {"device-tint", "tint"}
    assert all(r["label"] == "cyan" for r in records if r["head"] == "device-tint")


def test_the_head_is_fitted_on_the_int8_trunks_features_too(bundle, data2, tmp_path):
    """A head for a bundle with int8 variants is searched and fitted on the training images'
    features through the fp32 trunk and through every int8 trunk (an image's views in one fold):
    the saved head is that fit, not the fp32-only one, and the run records the views."""
    from edgetl.core.formats import FORMATS
    from edgetl.core.preprocess import load_image
    from edgetl.workstation.head_search import search_head

    finetune_head(data2, tmp_path / "r", trunk_from=bundle, config=TrainConfig(), progress=False)
    run = load_run(tmp_path / "r")
    int8 = [n for n, v in read_manifest(bundle)["variants"].items() if v["precision"] == "int8"]
    views = run.config["trunk_views"]
    assert views["trained_on"][0] == "onnx-fp32" and "onnx-int8" in views["trained_on"]
    assert sorted(views["trained_on"][1:] + list(views["left_out"])) == sorted(int8)

    b = open_bundle(bundle)
    images = [load_image(s.path) for s in run.train_samples]

    def features(name: str) -> np.ndarray:
        v = b.manifest["variants"][name]
        p = b.load(runtime=FORMATS[v["format"]].runtime, precision=v["precision"])
        return p.features(p.preprocess(images)).astype(np.float32)

    y = np.array([s.label for s in run.train_samples])
    stacked = np.concatenate([features(n) for n in views["trained_on"]])
    copies = len(views["trained_on"])
    groups = np.tile(np.arange(len(y)), copies)
    fit = search_head(stacked, np.tile(y, copies), len(TASK2), groups=groups, seed=0)
    fp32_only = search_head(stacked[: len(y)], y, len(TASK2), seed=0)
    saved = torch.load(tmp_path / "r" / "model.pt", weights_only=True)["head"]
    weight = next(v for k, v in saved.items() if k.endswith("weight")).numpy()
    np.testing.assert_allclose(weight, fit.weight, rtol=1e-4, atol=1e-5)
    assert not np.allclose(weight, fp32_only.weight, rtol=1e-4, atol=1e-5)


def test_an_int8_trunk_whose_runtime_is_missing_is_left_out_and_said_why(bundle, data2, tmp_path, monkeypatch):
    from edgetl.core.errors import BackendError
    from edgetl.device.bundle_loading import Bundle

    real = Bundle.load

    def without_openvino(self, options=None, /, **given):
        if given.get("runtime") == "openvino":
            raise BackendError("runtime 'openvino' is not installed: pip install openvino")
        return real(self, options, **given)

    monkeypatch.setattr(Bundle, "load", without_openvino)
    finetune_head(data2, tmp_path / "r", trunk_from=bundle, config=TrainConfig(), progress=False)
    views = load_run(tmp_path / "r").config["trunk_views"]
    assert "openvino-int8" not in views["trained_on"] and "onnx-int8" in views["trained_on"]
    assert "not installed" in views["left_out"]["openvino-int8"]
