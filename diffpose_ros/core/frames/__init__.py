"""A device frame made ready to register: line integrals on the detector grid (:mod:`.prepare`) and
the validity mask of the pixels that show the patient (:mod:`.field`)."""
