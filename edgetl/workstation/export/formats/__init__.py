"""Export formats as plug-ins: one module per format, found by the format's name in ``core/formats.py``.

Adding a format (LiteRT, NCNN, ...) is one row in :data:`edgetl.core.formats.FORMATS` (name,
runtime, graph extension, precisions, libraries, sidecar files) plus one module here named after
the format, ``formats/<name>.py``, holding ``FORMAT``: an object with this protocol
(:class:`ExportFormat`):

``name``
    The format's name, the key of its row in ``core/formats.py`` and its folder in the bundle.

``write(session)``
    Everything the format ships, from :meth:`ExportSession.sources` (the fp32 ONNX trunk and head
    exported from PyTorch, which every format starts from). For each of
    ``session.precisions(name)`` (fp32 first; the others are measured against it): write the
    graph files under ``<name>/`` and record them with ``session.add_file`` (sidecars from the
    table are recorded with them); declare the variant with ``session.add_variant`` (pin
    ``inference_precision`` if the runtime has such a setting); with ``session.options.merged``
    add the merged graph with ``session.add_merged(name, self.merge)``; then call
    ``session.check(name)``, which loads the variant through the device runtime and applies the
    shared checks (:mod:`edgetl.workstation.export.checks`). Files are named
    ``<name>/trunk.<precision><ext>``, ``<name>/head.<head><ext>``, ``<name>/merged.<head>.<precision><ext>``;
    fp32 is built even when not shipped (``session.drop_unrequested`` removes it afterwards).

``quantize(session, fp32_trunk, head, out) -> dict``
    The int8 trunk (called by ``write``): build the format's quantizer
    (:class:`edgetl.workstation.export.int8.Quantizer`: its remedies in order, how to score and
    save a model), run it through ``session.search_int8``, and return its record, the variant's
    ``quantization`` record (calibration images by count and one hash, never by path).
    Formats without int8 leave ``int8`` out of their ``precisions`` row and raise here.

``write_head(source, out)``
    For ``export --add-to``: write a head graph at ``out`` from ``source``, the head's fp32 ONNX
    graph exported from PyTorch (sidecars beside it, as the table names them).

``merge(trunk, head, out)``
    One graph image -> logits at ``out`` that computes exactly what ``trunk`` then ``head`` compute.

:func:`registry` imports ``formats/<name>.py`` for every row of the table and refuses a module
whose ``FORMAT.name`` is not its row, or a name registered twice.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgetl.core.formats import FORMATS

if TYPE_CHECKING:
    from edgetl.workstation.export.session import ExportSession


class ExportFormat(Protocol):
    name: str

    def write(self, session: ExportSession) -> None: ...

    def quantize(self, session: ExportSession, fp32_trunk: Path, head: Path, out: Path) -> dict[str, Any]: ...

    def write_head(self, source: Path, out: Path) -> None: ...

    def merge(self, trunk: Path, head: Path, out: Path) -> None: ...


_REGISTRY: dict[str, ExportFormat] = {}


def register(plugin: ExportFormat) -> ExportFormat:
    """Add ``plugin``; a name registered twice or missing from ``core/formats.py`` is a bug."""
    if plugin.name in _REGISTRY:
        raise ValueError(f"export format {plugin.name!r} is registered twice")
    if plugin.name not in FORMATS:
        raise ValueError(f"export format {plugin.name!r} has no row in edgetl.core.formats.FORMATS")
    _REGISTRY[plugin.name] = plugin
    return plugin


def registry() -> dict[str, ExportFormat]:
    """Format name -> plug-in, for every row of :data:`edgetl.core.formats.FORMATS`."""
    for name in FORMATS:
        if name not in _REGISTRY:
            module = importlib.import_module(f"{__name__}.{name}")
            if module.FORMAT.name != name:
                raise ValueError(f"{module.__name__}.FORMAT is named {module.FORMAT.name!r}, not {name!r}")
            register(module.FORMAT)
    return dict(_REGISTRY)


def get(name: str) -> ExportFormat:
    return registry()[name]
