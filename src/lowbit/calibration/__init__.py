"""lowbit.calibration: the calibration inputs (windows after the scored ones) and the engine that runs the model on
them block by block, serving the statistics methods ask for (importance, Hessians, block inputs)."""
