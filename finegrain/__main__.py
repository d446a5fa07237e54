"""`python -m finegrain` (and `torchrun -m finegrain`) runs the CLI."""
from finegrain.cli import main

if __name__ == "__main__":
    main()
