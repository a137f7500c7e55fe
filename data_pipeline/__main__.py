import sys

from data_pipeline.cli import main

# The guard matters: the tokenizing pool spawns processes that import this module again.
if __name__ == "__main__":
    sys.exit(main())
