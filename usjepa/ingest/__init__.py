"""Ingest: image sources -> ultrasound preprocessing -> WebDataset shards + manifest.

Modules, one job each: `sources` (readers and their registry), `region` (ultrasound-region
mask), `preprocess` (crop, stretch, resize), `splits` (group-disjoint splits),
`sample_format` (how a sample is stored), `writer` (build settings and the order of the
steps: `work` and `workdir` process items into resumable result files, `process` runs them
over workers, `selection` picks samples and splits, `pack` writes tars, `record` the report
and manifest), `manifest`, `verify`, `cli`.
Import from the modules; this package file stays empty so light imports stay light.
"""
