"""Folding a running overlay's changes back into an image: over the live
job (overlay: its devices, its stores) and the build job (the image made
from the merged view).  Never in the initramfs: it builds."""
