"""Shard building, laid out as its pipeline: `sources` (one module per input format, each with
typed options), `image` (region, colour overlays, intensity preprocessing), `build` (the steps:
work items -> selection and splits -> packing -> manifest and report), `settings`, `recipes`,
`verify`, `inspect`, `cli`. The shard format itself is `usjepa.shardset`. docs/data.md describes
it all for users. This file stays empty so light imports stay light."""
