"""Synthetic fluoroscopy: what a detector makes of a DRR (:mod:`.detector`) and what a clinical C-arm
adds to it (:mod:`.clinical`)."""
