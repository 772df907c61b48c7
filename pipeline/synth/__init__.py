"""`dualpm-prep synth`: a synthetic rigged-quadruped dataset in the published DualPM layout.

    quadruped.py   procedural animals: skeleton, implicit surface, marching cubes, decimation, weights
    poses.py       joint classes from names, per-class rotation limits, whole-body yaw -> pose files
    cameras.py     random cameras that frame the posed animal, written and read back as reference camera files
    appearance.py  fur-like coats attached to the canonical surface, Lambert shading, backgrounds
    generate.py    plan (models, ids, splits), Ray tasks per model chunk, resume, preview sheet
    command.py     the click command

Conventions of the generated data: Y-up world, animals face +Z (+X is their left), metres-like
units (about 1.5 to 2.5 units long), rest bounding box centred on the origin, ids `000001`... with
multiples of 5000 skipped, splits/val.txt (and splits/val_models.txt for held-out models), synth.json.
"""
