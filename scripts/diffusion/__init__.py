"""diffusion package of the cranial_implant_pcdiff bundle."""
