"""Names every layer shares."""

# The model name that builds small seeded random weights from a config: the tests' models.
TINY = "tiny-random"

# The members open_clip's loader takes as a sample's image.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Images more elongated than this are skipped (`extreme_aspect_ratio`) by the model stages.
MAX_ASPECT_RATIO = 100

# The toy world's trained models, shipped inside the package (dgaug/models/toy/): a latent
# diffusion model in diffusers' folder format and a CLIP in open_clip's local-dir format. The
# names resolve to those folders, which then load through the same code as any local checkpoint.
TOY_LDM = "toy-ldm"
TOY_CLIP = "toy-clip"
