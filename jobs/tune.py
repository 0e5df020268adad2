"""Ray job entrypoint for the tune stage.

    ray job submit --working-dir . -- python jobs/tune.py --config configs/demo.yaml [--tune.KEY=VALUE ...]

(`raylm submit tune` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["tune", *sys.argv[1:]]))
