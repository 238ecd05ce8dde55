"""One package per stage: download, edsam, features, ldfs. None imports another; dgaug.job.registry names them."""
