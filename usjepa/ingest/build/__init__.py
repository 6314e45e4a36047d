"""The build steps in their order: `item` and `workers` (phase 1: every item processed into a
resumable result file under OUT/.work, `workdir`), `select` and `splits` (which samples, which
split), `pack` (the tars), `record` (report and manifest); `run` chains them."""
