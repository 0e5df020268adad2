"""Ray job entrypoint for the distill stage.

    ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml [--distill.KEY=VALUE ...]

(`raylm submit distill` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
