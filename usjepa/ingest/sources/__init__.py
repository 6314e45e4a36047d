"""Source formats, one module each; importing this package registers all of them in `SOURCES`
(import order = the order `--format auto` asks them in)."""

from usjepa.ingest.sources import csv, dicom, filenames, imagefolder, ultrabench, video  # noqa: F401  (register)
from usjepa.ingest.sources.base import SOURCES, Source, SourceItem, open_source  # noqa: F401
