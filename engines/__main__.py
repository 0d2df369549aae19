"""`python -m medusa_export.engines ARTIFACT`: build or rebuild only the TensorRT engines of an artifact."""

import sys

from .cli_entry import main

sys.exit(main())
