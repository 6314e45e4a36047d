"""Where `BuildSettings` and `build_shards` used to live; kept for importers outside the ingest
package (tests/conftest.py, tests/test_pipeline.py, tests/test_bench.py, tools/bench_step.py)."""

from usjepa.ingest.build.run import build_shards, run_build  # noqa: F401
from usjepa.ingest.settings import BuildSettings  # noqa: F401
