"""`python -m regina_cli` is the same as the `regina` executable."""

from regina_cli.cli import main

if __name__ == "__main__":
    main()
