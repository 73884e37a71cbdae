"""A stand-in for the parts of OpenOOD v1.5 that `--backend openood` touches (openood is not on the package index).

Each class reproduces the v1.5 code paths that decide where it can run: `BasePostprocessor.inference` moves every
batch with `.cuda()`; msp/ebo/mls/odin have no setup; mds, knn, vim and react move their setup batches with
`.cuda()`; `MDSPostprocessor.__init__` looks its class count up by dataset name; ODIN takes its input std from
OpenOOD's normalisation table (0.5 for unknown datasets). The scores are OpenOOD's formulas.
"""
