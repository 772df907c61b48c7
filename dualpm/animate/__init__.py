"""`dualpm-animate`: predictions of a frame sequence -> the user's rig animated (GLB, BVH, published layout).

Modules: `inputs` (frames, order, template), `fit` (poses and cameras from point pairs), `glb`, `bvh`,
`dataset` (writers), `cli` (the command).
"""
