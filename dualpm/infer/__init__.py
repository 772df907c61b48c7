"""`dualpm-infer`: run a trained DualPM model on a prepared dataset or on image folders.

The files, in the order the data flows through them:

    batches.py      inputs: a dataset split's stored features, or image + mask folders -> features (`Batch`)
    predictors.py   the model of a checkpoint (or the oracle: the ground truth) -> `PredictedMaps`;
                    the checkpoint's extractor and PCA basis for raw images
    writers.py      per sample: PLY point clouds, the picture sheet, the skeleton fit
    cli.py          the command: checks the inputs, runs the three above, writes predictions.zarr

The predictions store itself (format, keep rule, reader) is `dualpm.predictions`, below both this
package and `dualpm.eval`.
"""

from dualpm.errors import DualPMError


class InferError(DualPMError):
    """Inference inputs that cannot be used together (checkpoint, dataset, images, mesh)."""
