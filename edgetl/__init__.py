"""edgetl: adapt an ImageNet backbone to your images, export it, run it on the edge.

Four packages, and the folder says where each runs (docs/design.md has the diagram):

* ``edgetl.core``: torch-free pieces both sides share (errors, the format table, the bundle
  manifest, images and preprocessing, shipped YAML, machine facts);
* ``edgetl.workstation``: training, heads, study, probe, export and quantization (torch);
* ``edgetl.device``: runtime back-ends, predictor, bench, doctor, pack, deploy (never torch);
* ``edgetl.cli``: the thin command line over both.

The direction (cli -> workstation -> device -> core) is checked by import-linter in CI.
"""

__version__ = "0.1.0"
