"""Data in: finding a dataset's images and labels, decoding them, augmenting, caching, packing, downloading."""
