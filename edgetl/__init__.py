"""edgetl: adapt an ImageNet backbone to your images, export it, run it on the edge.

The package is library first; ``edgetl.cli`` is a thin layer over it. Modules that need torch
(``backbones`` builders, ``train``, ``export``) import it lazily, so the device side
(``edgetl.runtime``, ``edgetl.bundle``, ``edgetl.preprocess``, ``edgetl.bench``) runs without it.
"""

__version__ = "0.1.0"
