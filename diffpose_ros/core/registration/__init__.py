"""2D/3D registration: image similarity (:mod:`.similarity`) and least-squares costs (:mod:`.cost`),
a frame's polarity and intensity map (:mod:`.intensity`), the pyramid levels (:mod:`.levels`), the
Levenberg-Marquardt solver (:mod:`.solver`), one X-ray's registration (:mod:`.registrar`), and the
intraoperative pipeline (:mod:`.pipeline`) with its typed result (:mod:`.result`)."""
