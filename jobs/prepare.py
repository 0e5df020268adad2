"""Ray job entrypoint for the prepare stage.

    ray job submit --working-dir . -- python jobs/prepare.py --config configs/demo.yaml [--prepare.KEY=VALUE ...]

(`raylm submit prepare` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["prepare", *sys.argv[1:]]))
