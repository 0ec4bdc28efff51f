"""The dmsetup-style ``dmrepl`` command."""
