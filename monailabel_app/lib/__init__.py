"""Library of the zoo's MONAI Label app (see ``main.py``)."""
