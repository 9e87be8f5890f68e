"""`python -m sdtune.caption`: the flags and the run are sdtune/caption/cli.py's."""

from sdtune.caption.cli import main

if __name__ == "__main__":
    main()
