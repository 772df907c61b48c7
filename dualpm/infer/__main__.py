"""`python -m dualpm.infer ...` runs `dualpm-infer`."""

from dualpm.infer.cli import main

main()
