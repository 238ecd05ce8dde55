"""Names every layer shares."""

# The model name that builds small seeded random weights from a config: the tests' models.
TINY = "tiny-random"

# The members open_clip's loader takes as a sample's image.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Images more elongated than this are skipped (`extreme_aspect_ratio`) by the model stages.
MAX_ASPECT_RATIO = 100
