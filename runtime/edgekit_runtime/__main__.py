"""``python -m edgekit_runtime`` is ``edgekit-runtime``."""

from edgekit_runtime.cli import main

main()
