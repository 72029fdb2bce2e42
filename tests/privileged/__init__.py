"""Tests that need root and a kernel with device-mapper: scripts/vmtest runs them."""
