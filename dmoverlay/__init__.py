"""dmoverlay: writable live runtimes from read-only media.

Three jobs: build an ext4-in-squashfs runtime from a root tree, set up the
device-mapper overlay at boot, and apply updates onto the writable root.
"""

__version__ = "0.1.0"
