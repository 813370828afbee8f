"""lowbit.calibration: the calibration inputs (``importance``: the windows or paragraphs after the scored ones) and
the engine that runs the model on them block by block (``engine``: one block's inputs alive at a time), serving the
statistics methods ask for (``statistics``: importance, mean |x|, Hessians, outlier counts) and each block's inputs
and outputs."""
