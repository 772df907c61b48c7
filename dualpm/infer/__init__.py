"""`dualpm-infer`: run a trained DualPM model on a prepared dataset or on image folders (see cli.py)."""
