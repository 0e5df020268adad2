"""Ray job entrypoint for the quantize stage.

    ray job submit --working-dir . -- python jobs/quantize.py --config configs/demo.yaml [--quantize.KEY=VALUE ...]

(`raylm submit quantize` does the same and ships the raylm package with the job.)
"""

import sys

from raylm.cli import main

sys.exit(main(["quantize", *sys.argv[1:]]))
