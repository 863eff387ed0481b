"""python -m torch_xmc train | evaluate | compare (see torch_xmc.cli)."""
from .cli import main

if __name__ == "__main__":  # guarded: compare measures each run in a spawned process, which imports this module
    main()
