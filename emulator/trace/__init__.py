"""Request traces: the v1 Arrow schema and :class:`Trace`, file IO, importers of public
traces and synthetic generators. See DESIGN.md section 6 and traces/README.md."""

from emulator.trace.importers import (
    import_azure,
    import_mooncake,
    import_servegen,
    import_vidur,
)
from emulator.trace.io import describe, iter_trace_batches, read_trace, write_trace
from emulator.trace.schema import SCHEMA_VERSION, Trace, arrow_schema
from emulator.trace.synth import sample_arrivals, synth_trace

__all__ = [
    "SCHEMA_VERSION", "Trace", "arrow_schema", "read_trace", "write_trace",
    "iter_trace_batches", "describe", "import_azure", "import_vidur", "import_mooncake",
    "import_servegen", "synth_trace", "sample_arrivals",
]
