"""C-arm geometry: pinhole intrinsics and clinical views (:mod:`.camera`), rigid transforms on SE(3)
(:mod:`.se3`), the LPS/RAS conventions and a frame's place on its detector (:mod:`.conventions`), and
registration errors in millimetres (:mod:`.metrics`)."""
