"""`python -m sdtune.batch`: the flags and the run are sdtune/batch/cli.py's."""

from sdtune.batch.cli import main

if __name__ == "__main__":
    main()
