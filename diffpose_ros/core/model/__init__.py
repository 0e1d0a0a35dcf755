"""The patient model: the pose CNN (:mod:`.regressor`), views over the clinical range
(:mod:`.sampling`), training augmentations (:mod:`.augment`), preoperative training (:mod:`.train`)
and the model file a node preloads (:mod:`.bundle`)."""
