"""`python -m expertmesh.actors.model.kernels`: build (or find) this machine's CPU kernels."""
from . import main

raise SystemExit(main())
