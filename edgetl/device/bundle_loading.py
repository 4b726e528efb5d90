"""Open a bundle on the device: verify it, then load one variant into a :class:`Predictor`. No torch.

A bundle holds one trunk (image -> pooled features) and one or more heads (features -> logits) per
variant (format + precision). :meth:`Bundle.load` picks the variant for a runtime and precision,
the heads, and hands each file to the runtime's back-end (:mod:`edgetl.device.backends`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgetl.core.bundle import read_manifest, verify_files
from edgetl.core.errors import BackendError, BundleError, ConfigError
from edgetl.core.formats import DEFAULT_RUNTIME, PRECISIONS, variant_name
from edgetl.core.preprocess import Preprocessing
from edgetl.device import limits
from edgetl.device.backends import LOAD_OPTIONS, backend, check_load_options, import_backend
from edgetl.device.predictor import Predictor

log = logging.getLogger(__name__)

ALL_HEADS = "all"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How :meth:`Bundle.load` loads a bundle: which variant and heads, on what, with how many threads.

    ``runtime`` None: :data:`~edgetl.core.formats.DEFAULT_RUNTIME`; ``precision`` None: fp32 when the
    bundle has it, else its only precision for the runtime; ``heads`` None: the default head,
    ``"all"``: every head. ``provider``/``provider_options``: ONNX Runtime execution provider
    (default CPU); ``device``: OpenVINO device (default CPU; with ONNX Runtime, the OpenVINO
    provider's device); ``streams``: OpenVINO CPU/GPU streams. ``None`` leaves each to the runtime.
    ``merged``: load each head's single-graph file (trunk + head in one graph, ``export --merged``)
    instead of the shared trunk; each head then runs its own copy of the trunk.
    """

    runtime: str | tuple[str, ...] | None = None  # a tuple: a device profile's order of preference
    precision: str | None = None
    heads: str | Sequence[str] | None = None
    threads: int | None = None
    provider: str | None = None
    provider_options: dict[str, Any] | None = None
    device: str | None = None
    streams: int | None = None
    merged: bool = False

    def accelerator_options(self) -> dict[str, Any]:
        """The options set besides threads (provider, provider_options, device, streams), for the back-end."""
        return {k: getattr(self, k) for k in LOAD_OPTIONS if getattr(self, k) is not None}


def open_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read the manifest and (by default) check every file's sha256 before anything is loaded.

    A bundle travels by USB stick and scp; a truncated or edited model file must fail here with the
    file named, not later as a puzzling ONNX Runtime error or, worse, as wrong predictions.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(path, manifest)


class Bundle:
    """A verified bundle: its input contract, heads with their labels, and the variants it holds."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.preprocessing: Preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        self.heads: dict[str, tuple[str, ...]] = {name: tuple(h["labels"]) for name, h in manifest["heads"].items()}
        default = manifest.get("default_head")
        if default is None and len(self.heads) == 1:
            default = next(iter(self.heads))
        if default is not None and default not in self.heads:
            raise BundleError(
                f"bundle {self.path}: default_head {default!r} is not one of its heads ({', '.join(self.heads)})"
            )
        self.default_head: str | None = default
        self.variants: tuple[str, ...] = tuple(manifest["variants"])

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, variants={list(self.variants)}, heads={list(self.heads)})"

    def precisions(self, fmt: str) -> list[str]:
        """Precisions available for one format, in the canonical order (fp32 first)."""
        have = {v["precision"] for v in self.manifest["variants"].values() if v["format"] == fmt}
        return [p for p in PRECISIONS if p in have]

    def variant(self, fmt: str, precision: str) -> dict[str, Any]:
        """The manifest record of one variant; a BundleError lists what the bundle has instead."""
        name = variant_name(fmt, precision)
        try:
            return self.manifest["variants"][name]
        except KeyError:
            raise BundleError(
                f"bundle {self.path} has no {name} variant (it has: {', '.join(self.variants)}); "
                "choose another --precision/--runtime or re-export"
            ) from None

    def runtime_precisions(self, runtime: str) -> list[str]:
        """Precisions this bundle holds for a runtime; BackendError when it holds none."""
        fmt = backend(runtime).format
        have = self.precisions(fmt)
        if not have:
            raise BackendError(
                f"bundle {self.path} has no {fmt} files for runtime {runtime!r} (it has: {', '.join(self.variants)}); "
                f"use another --runtime or re-export with --model-format {fmt}"
            )
        return have

    def pick_runtime(self, preference: Sequence[str], precision: str | Sequence[str] | None = None) -> str:
        """The first runtime of ``preference`` (a device profile's order) whose library is installed
        here and whose format this bundle holds, in ``precision`` (all of them, for a list) when
        given; BackendError saying what each one lacks when none fits."""
        wanted = [precision] if isinstance(precision, str) else list(precision or [])
        reasons = []
        for runtime in preference:
            spec = backend(runtime)
            have = self.precisions(spec.format)
            if not have:
                reasons.append(f"{runtime}: the bundle has no {spec.format} variant")
            elif any(p not in have for p in wanted):
                reasons.append(f"{runtime}: the bundle has {', '.join(have)} only")
            elif spec.loader is None or importlib.util.find_spec(spec.module) is None:
                reasons.append(f"{runtime}: not installed ({spec.install_hint})")
            else:
                return runtime
        raise BackendError(
            f"none of the runtimes {', '.join(preference)} can run bundle {self.path} here ("
            + "; ".join(reasons)
            + "); pass --runtime, or re-export with --export-profile pi"
        )

    def resolve_precision(self, runtime: str, precision: str | None) -> str:
        """``None`` means fp32 when the bundle has it, else its only precision for this runtime."""
        have = self.runtime_precisions(runtime)
        if precision is None:
            if "fp32" in have or len(have) == 1:
                return "fp32" if "fp32" in have else have[0]
            raise BundleError(f"bundle {self.path} has {', '.join(have)} for {runtime}; choose one with --precision")
        if precision not in have:
            raise BundleError(
                f"bundle {self.path} has no {precision} variant for {runtime} (it has: {', '.join(have)})"
            )
        return precision

    def resolve_heads(self, variant: dict[str, Any], heads: str | Sequence[str] | None) -> tuple[str, ...]:
        """``None``: the default head; ``"all"``: every head of the variant; else the names given."""
        available = [h for h in self.heads if h in variant["heads"]]
        if heads is None:
            if self.default_head is None:
                raise BundleError(
                    f"bundle {self.path} has several heads ({', '.join(self.heads)}) and no default; "
                    "choose one with --head NAME or --head all"
                )
            heads = [self.default_head]
        elif heads == ALL_HEADS:
            heads = available
        elif isinstance(heads, str):
            heads = [heads]
        for h in heads:
            if h not in available:
                raise BundleError(
                    f"bundle {self.path} has no head {h!r} in this variant (it has: {', '.join(available)})"
                )
        if not heads:
            raise ConfigError("no head selected")
        return tuple(dict.fromkeys(heads))

    def files_of(self, variant: dict[str, Any], heads: Sequence[str]) -> list[str]:
        """Relative paths of the trunk and the given heads of a variant."""
        return [variant["trunk"], *(variant["heads"][h] for h in heads)]

    def model_bytes(self, variant: dict[str, Any], heads: Sequence[str]) -> int:
        """What the device stores for this variant: trunk + heads, companion files (.bin) included."""
        total = 0
        for rel in dict.fromkeys(self.files_of(variant, heads)):
            rec = self.manifest["files"][rel]
            companions = (rec.get("extra_files") or {}).values()
            total += int(rec.get("bytes", 0)) + sum(int(r.get("bytes", 0)) for r in companions)
        return total

    def load(self, options: LoadOptions | None = None, /, **given: Any) -> Predictor:
        """Create the sessions of one variant: its trunk and the selected heads (see :class:`LoadOptions`).

        ``options``, or the same fields as keywords (``bundle.load(precision="int8", threads=1)``);
        keywords given with ``options`` replace its fields.
        """
        if options is None:
            options = LoadOptions(**given)
        elif given:
            options = dataclasses.replace(options, **given)
        o = options
        runtime, precision, threads, merged = o.runtime or DEFAULT_RUNTIME, o.precision, o.threads, o.merged
        preferred = not isinstance(runtime, str)
        if preferred:  # a device profile's runtimes in order of preference
            runtime = self.pick_runtime(runtime, precision)
        for name, value in (("threads", threads), ("streams", o.streams)):
            if value is not None:
                limits.check(name, value)
        spec = backend(runtime)
        accel = o.accelerator_options()
        if preferred:  # the profile's options for the runtimes it did not pick do not apply
            accel = {k: v for k, v in accel.items() if k in spec.options}
        check_load_options(runtime, accel)
        precision = self.resolve_precision(runtime, precision)
        variant = self.variant(spec.format, precision)
        head_names = self.resolve_heads(variant, o.heads)
        warn_saturation(variant_name(spec.format, precision), variant)
        import_backend(runtime)
        assert spec.loader is not None  # import_backend refuses unimplemented back-ends
        if spec.check_options is not None:
            accel = spec.check_options(accel)
        if variant.get("inference_precision") is not None:  # OpenVINO: what the export measured
            accel["inference_precision"] = variant["inference_precision"]
        if merged:
            missing = [h for h in head_names if h not in (variant.get("merged") or {})]
            if missing:
                raise BundleError(
                    f"bundle {self.path}: variant {variant_name(spec.format, precision)} has no merged graph for "
                    f"head {missing[0]!r}; export with --merged"
                )
            trunk = None
            head_models = {
                h: self._open(spec.loader, variant["merged"][h], threads, accel, image_input=True, head=h)
                for h in head_names
            }
        else:
            trunk = self._open(spec.loader, variant["trunk"], threads, accel, image_input=True)
            head_models = {
                h: self._open(spec.loader, variant["heads"][h], threads, accel, head=h, features=trunk)
                for h in head_names
            }
        first = trunk if trunk is not None else next(iter(head_models.values()))
        return Predictor(
            bundle=self,
            runtime=runtime,
            precision=precision,
            variant=variant_name(spec.format, precision),
            trunk=trunk,
            heads=head_models,
            runtime_info=getattr(first, "runtime_info", None),
        )

    def _open(
        self,
        loader: Any,
        rel: str,
        threads: int | None,
        accel: dict[str, Any],
        *,
        image_input: bool = False,
        head: str | None = None,
        features: Any = None,
    ) -> Any:
        """Load one model file and check the graph it declares against the manifest (see
        :func:`check_graph`), so a mismatch is one line naming the file here, not a traceback from
        the runtime at the first batch, or wrong labels later."""
        model = loader(self.path / rel, threads=threads, **accel)
        check_graph(self, rel, model, image_input=image_input, head=head, features=features)
        return model


def _show(shape: Sequence[Any], dtype: Any) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in shape)
    return f"[{dims}] {dtype}"


def check_graph(
    bundle: Bundle, rel: str, model: Any, *, image_input: bool = False, head: str | None = None, features: Any = None
) -> None:
    """Refuse a model file whose graph does not match its manifest record (rank, static dimensions,
    dtype float32), the preprocessing's input size (a trunk or merged graph takes (N, 3, S, S)), the
    head's label count (its last output dimension) or the trunk's feature width (a head's input).

    Uses what the back-end reports in ``model.signature`` (``{"inputs": [(dims, dtype)], "outputs":
    [...]}``, dims None where dynamic); a model without one (a test double) is not checked.
    """
    sig = getattr(model, "signature", None)
    if not sig:
        return
    where = f"bundle {bundle.path}: {rel}"
    for side in ("inputs", "outputs"):
        dtype = sig[side][0][1]
        if dtype != "float32":
            raise BundleError(f"{where}: the graph's {side[:-1]} is {dtype}; edgetl models take and return float32")
    in_dims, out_dims = sig["inputs"][0][0], sig["outputs"][0][0]
    if image_input:
        s = bundle.preprocessing.input_size
        if len(in_dims) != 4 or any(g is not None and g != w for g, w in zip(in_dims[1:], (3, s, s), strict=True)):
            raise BundleError(
                f"{where}: the graph takes {_show(in_dims, 'float32')} but the manifest's preprocessing "
                f"makes (N, 3, {s}, {s}) (input_size {s}); re-export the bundle"
            )
    if features is not None and getattr(features, "signature", None):
        width = features.signature["outputs"][0][0][-1:] or [None]
        if in_dims and None not in (width[0], in_dims[-1]) and width[0] != in_dims[-1]:
            raise BundleError(
                f"{where}: head {head!r} takes {in_dims[-1]} features but the trunk gives {width[0]}; "
                "re-export the bundle"
            )
    if head is not None:
        labels = len(bundle.heads[head])
        width = out_dims[-1] if out_dims else None
        if len(out_dims) != 2 or (width is not None and width != labels):
            raise BundleError(
                f"{where}: the graph returns {_show(out_dims, 'float32')} but head {head!r} has {labels} labels; "
                "re-export the bundle"
            )
    record = bundle.manifest["files"].get(rel, {})
    for side in ("inputs", "outputs"):
        (dims, dtype), what = sig[side][0], side[:-1]
        declared = record.get(side)
        if not (isinstance(declared, list) and len(declared) == 1 and isinstance(declared[0], dict)):
            continue  # validate_manifest does not require the records; nothing to compare
        want_dims, want_dtype = declared[0].get("shape"), declared[0].get("dtype", "float32")
        mismatch = want_dtype != dtype or not isinstance(want_dims, list) or len(want_dims) != len(dims)
        if not mismatch:
            mismatch = any(
                isinstance(w, int) and g is not None and w != g for w, g in zip(want_dims, dims, strict=True)
            )
        if mismatch:
            raise BundleError(
                f"{where}: the manifest records {what} {_show(want_dims or [], want_dtype)} but the graph has "
                f"{_show(dims, dtype)}; re-export the bundle"
            )


__all__ = ["ALL_HEADS", "Bundle", "LoadOptions", "check_graph", "open_bundle"]


_SATURATION_SAID: set[str] = set()


def warn_saturation(name: str, variant: dict[str, Any], saturates: bool | None = None) -> str | None:
    """The warning for an int8 variant that the export found to lose accuracy on CPUs whose int8
    kernels saturate (``int8_saturation``: ONNX Runtime's on x86 without VNNI or AMX), when the CPU
    is one of them: ``saturates`` says so for a device (deploy's check), None means this CPU, and
    then the warning is also logged (once per variant and process). None when it does not apply."""
    from edgetl.core import envinfo

    record = variant.get("int8_saturation")
    here = saturates is None
    if not isinstance(record, dict) or not (envinfo.int8_saturates() if here else saturates):
        return None
    message = (
        f"variant {name} loses {record.get('top1_drop_pp', float('nan')):.2f} pp top-1 on a CPU like this one "
        "(x86 without VNNI or AMX: ONNX Runtime's int8 kernels saturate), as measured at export; it keeps its "
        "accuracy on ARM and VNNI CPUs. Here run openvino-int8 or the fp32 variant (--precision fp32)"
    )
    if here and name not in _SATURATION_SAID:
        _SATURATION_SAID.add(name)
        log.warning(message)
    return message
