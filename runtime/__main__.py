import sys

from moerun.runtime.cli import main

sys.exit(main())
