"""The feature cache on disk: stores of parts (HDF5 or WebDataset), the manifest and records."""
