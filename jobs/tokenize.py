"""Ray job entrypoint for the tokenize stage.

    ray job submit --working-dir . -- python jobs/tokenize.py --config configs/demo.yaml [--tokenize.KEY=VALUE ...]

(`raylm submit tokenize` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["tokenize", *sys.argv[1:]]))
