"""The shard-set format, shared by the builder (`usjepa.ingest`) that writes it and the readers
(`usjepa.data`, `usjepa.eval`, `usjepa.bench`): `sample` (how one sample is stored in a tar)
and `manifest` (the description beside the tars). It imports nothing else of the package but
`errors` and `fileio`, so readers never depend on the builder. The format: docs/data.md."""
