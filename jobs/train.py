"""Ray job entrypoint for the train stage.

    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml [--train.KEY=VALUE ...]

(`raylm submit train` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
