"""`python -m comfyui_krea ...` -> the command line in standalone/cli.py."""
import sys

from .standalone.cli import main

if __name__ == "__main__":
    sys.exit(main())
