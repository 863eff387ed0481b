"""python -m torch_xmc train | evaluate | compare (see torch_xmc.cli)."""
from .cli import main

main()
