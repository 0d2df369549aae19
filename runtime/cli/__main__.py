"""`python -m medusa_export.runtime.cli` runs the same CLI as the `medusa-export` script."""

from .app import main

main()
