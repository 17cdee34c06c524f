"""A new site: how far its images are from the training set, unlabelled adaptation, labelled recalibration."""
