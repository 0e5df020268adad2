"""Ray job entrypoint for the tokenize stage.

    ray job submit --working-dir . -- python jobs/tokenize_job.py --config configs/demo.yaml [--tokenize.KEY=VALUE ...]

(`raylm submit tokenize` does the same and ships the raylm package with the job.)
Not named tokenize.py: as a script's own directory comes first on sys.path, that name would
shadow Python's standard `tokenize` module, which `logging` imports.
"""

import sys

from raylm.cli import main

sys.exit(main(["tokenize", *sys.argv[1:]]))
