"""`python -m mmprep` runs the CLI."""

from mmprep.cli import main

if __name__ == "__main__":
    main()
