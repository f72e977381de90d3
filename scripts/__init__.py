"""Python package of the cranial_implant_pcdiff MONAI bundle (imported by configs as `$scripts...`)."""
