"""Ray job entrypoint for the evaluate stage.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/demo.yaml [--evaluate.KEY=VALUE ...]

(`raylm submit evaluate` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
