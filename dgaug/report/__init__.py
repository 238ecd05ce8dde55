"""`dgaug report`: a run's augmentations, feature space and progress on one self-contained HTML page."""
