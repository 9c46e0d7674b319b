"""`python -m moerun`, which is how torchrun starts each rank (`torchrun --nproc-per-node N -m moerun serve -c X`).

pyproject.toml maps the package `moerun` to the repository root, whose packages are runtime/, backends/ and
configs/; this file is the one module at that level, so an installed wheel holds it as moerun/__main__.py."""

import sys

from moerun.runtime.cli import main

sys.exit(main())
