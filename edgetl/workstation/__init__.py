"""The workstation side: run folders, backbones and weights, data, training, heads, study, probe,
export and quantization. Needs the ``train`` extra (torch); imports torch lazily where it can."""
