"""Files the tools read and write: X-ray images and pose JSON (:mod:`.files`), DICOM X-rays
(:mod:`.dicom`)."""
