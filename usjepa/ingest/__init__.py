"""Ingest: image sources -> ultrasound preprocessing -> WebDataset shards + manifest.

Modules, one job each: `sources` (readers and their registry), `region` (ultrasound-region
mask), `preprocess` (crop, stretch, resize), `splits` (group-disjoint splits),
`sample_format` (how a sample is stored), `writer` (build), `manifest`, `verify`, `cli`.
Import from the modules; this package file stays empty so light imports stay light.
"""
