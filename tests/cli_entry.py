"""`python tests/cli_entry.py ARGS` = `edgetl ARGS` with the tests' tiny backbone registered.

Used by tests that need a separate process (kill -9 and resume, torchrun with 2 processes).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import register_tiny_backbone

register_tiny_backbone()

from edgetl.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
