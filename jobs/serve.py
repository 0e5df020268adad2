"""Ray job entrypoint for the serve stage.

    ray job submit --working-dir . -- python jobs/serve.py --config configs/demo.yaml [--serve.KEY=VALUE ...]

(`raylm submit serve` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
